//! Appendix D numerically: logits as soft Q-values, and the soft value
//! `V(s) = beta * logsumexp(Q(s, .) / beta)` approaching the hard `max_a Q(s, a)` as beta
//! shrinks ("optimistic bootstrapping").
//!
//! Reading a trained policy's logits `l(s, .)` as `Q(s, .) / beta_train`, the soft value at
//! `beta_train` is exactly `beta_train * logsumexp(l)`, and its excess over the best action seen
//! in the data at `s` is `-beta_train * log pi(a_data | s)` (for the data action of highest
//! probability): the part of the state's value that comes from actions no demonstration took.
//! Logits are defined up to a constant per state, so Q is too; every difference reported here
//! (soft minus max, soft minus data) is invariant to it.

use super::mdp::{N_ACTIONS, State, Trajectory};
use serde::Serialize;

/// `beta * logsumexp(q / beta)`, computed stably.
pub fn soft_value(q: &[f64], beta: f64) -> f64 {
    let m = hard_max(q);
    m + beta * q.iter().map(|x| ((x - m) / beta).exp()).sum::<f64>().ln()
}

/// `max_a q[a]`.
pub fn hard_max(q: &[f64]) -> f64 {
    q.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
}

/// Index of the largest entry (first on ties).
pub fn argmax(q: &[f64]) -> usize {
    let m = hard_max(q);
    q.iter().position(|&x| x == m).unwrap_or(0)
}

/// One row of the generic table: soft value vs hard max at one beta.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoftMaxRow {
    pub beta: f64,
    pub soft_value: f64,
    pub hard_max: f64,
    /// `soft_value - hard_max`, in `[0, beta * ln 3]` for three actions.
    pub soft_minus_max: f64,
}

/// Soft value vs hard max of one Q vector over a list of betas.
pub fn soft_max_table(q: &[f64], betas: &[f64]) -> Vec<SoftMaxRow> {
    betas
        .iter()
        .map(|&b| {
            let s = soft_value(q, b);
            let h = hard_max(q);
            SoftMaxRow {
                beta: b,
                soft_value: s,
                hard_max: h,
                soft_minus_max: s - h,
            }
        })
        .collect()
}

/// The actions that some demonstration takes at each decision state on a demonstration path
/// (prefix, sorted actions). States off every demonstration path are not listed.
pub fn data_actions() -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut out: Vec<(Vec<usize>, Vec<usize>)> = vec![];
    for d in Trajectory::DEMOS {
        for t in 0..d.0.len() {
            let prefix = d.0[..t].to_vec();
            match out.iter_mut().find(|(p, _)| *p == prefix) {
                Some((_, acts)) => {
                    if !acts.contains(&d.0[t]) {
                        acts.push(d.0[t]);
                        acts.sort();
                    }
                }
                None => out.push((prefix, vec![d.0[t]])),
            }
        }
    }
    out.sort_by_key(|(p, _)| match State::from_prefix(p) {
        Some(State::Node(n)) => n,
        _ => usize::MAX,
    });
    out
}

/// Appendix-D quantities at one decision state of one trained policy, at one evaluation beta.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateValueRow {
    /// State name, e.g. `s9`.
    pub state: String,
    /// Action prefix, e.g. `a1a1`; empty for `s1`.
    pub prefix: String,
    /// The beta at which the soft value is evaluated.
    pub beta_eval: f64,
    /// `Q = beta_train * logits`.
    pub q: [f64; N_ACTIONS],
    pub soft_value: f64,
    pub hard_max: f64,
    pub soft_minus_max: f64,
    /// Largest Q among the actions the demonstrations take here.
    pub max_data_q: f64,
    /// `soft_value - max_data_q`: value credited to the state beyond its best seen action.
    pub soft_minus_data: f64,
    /// The action of largest Q, and whether a demonstration takes it here.
    pub argmax_action: usize,
    pub argmax_in_data: bool,
}

/// Rows for one state's logits (`beta_train` turns logits into Q), over `betas_eval`.
pub fn state_rows(
    prefix: &[usize],
    logits: [f64; N_ACTIONS],
    data: &[usize],
    beta_train: f64,
    betas_eval: &[f64],
) -> Vec<StateValueRow> {
    let q = logits.map(|l| beta_train * l);
    let max_data_q = data.iter().map(|&a| q[a]).fold(f64::NEG_INFINITY, f64::max);
    let am = argmax(&q);
    let state = State::from_prefix(prefix)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let prefix_s: String = prefix.iter().map(|a| format!("a{a}")).collect();
    betas_eval
        .iter()
        .map(|&b| {
            let s = soft_value(&q, b);
            let h = hard_max(&q);
            StateValueRow {
                state: state.clone(),
                prefix: prefix_s.clone(),
                beta_eval: b,
                q,
                soft_value: s,
                hard_max: h,
                soft_minus_max: s - h,
                max_data_q,
                soft_minus_data: s - max_data_q,
                argmax_action: am,
                argmax_in_data: data.contains(&am),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_value_tends_to_max_from_above() {
        let q = [0.3, -1.0, 0.25];
        let betas = [1.0, 0.5, 0.1, 0.05, 0.01, 0.001];
        let t = soft_max_table(&q, &betas);
        for w in t.windows(2) {
            assert!(w[1].soft_minus_max < w[0].soft_minus_max, "{w:?}");
        }
        for r in &t {
            assert!(r.soft_minus_max >= 0.0 && r.soft_minus_max <= r.beta * 3f64.ln() + 1e-12);
        }
        assert!(t.last().unwrap().soft_minus_max < 1e-12);
        // equal Q values: the gap is exactly beta ln(n)
        assert!((soft_value(&[2.0, 2.0, 2.0], 0.5) - (2.0 + 0.5 * 3f64.ln())).abs() < 1e-12);
        // stable for tiny beta and large Q
        assert!((soft_value(&[1e3, 0.0, -1e3], 1e-4) - 1e3).abs() < 1e-9);
    }

    #[test]
    fn data_actions_of_the_demonstrations() {
        let d = data_actions();
        let get = |p: &[usize]| d.iter().find(|(q, _)| q == p).map(|(_, a)| a.clone());
        assert_eq!(get(&[]), Some(vec![0, 1, 2]));
        assert_eq!(get(&[1, 1]), Some(vec![0]));
        assert_eq!(get(&[0, 0]), Some(vec![0]));
        assert_eq!(get(&[2]), Some(vec![2]));
        assert_eq!(get(&[0, 1]), None);
        assert_eq!(d.len(), 7);
        assert_eq!(d[0].0, Vec::<usize>::new());
    }

    #[test]
    fn soft_minus_data_is_minus_beta_log_pi() {
        let logits = [0.2, 2.0, -0.5];
        let rows = state_rows(&[1, 1], logits, &[0], 0.1, &[0.1]);
        let r = &rows[0];
        let lse = logits.iter().map(|x: &f64| x.exp()).sum::<f64>().ln();
        let log_pi0 = logits[0] - lse;
        assert!((r.soft_minus_data - (-0.1 * log_pi0)).abs() < 1e-12);
        assert_eq!((r.argmax_action, r.argmax_in_data), (1, false));
        assert_eq!((r.state.as_str(), r.prefix.as_str()), ("s9", "a1a1"));
    }
}
