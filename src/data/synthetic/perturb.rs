//! Perturbations of a response: known ways to make a summary worse (or, for
//! `AddLesserFact` within the length budget, no better). For tests, and for mixing into
//! preference candidates.

use super::{EOS, Post, Task};
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

/// One way to perturb a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Perturbation {
    /// Insert a fact or filler token absent from the post at a random place.
    Hallucinate,
    /// Insert a copy of a random word right after it.
    Repeat,
    /// Remove the EOS (a sample that never ended; scored as unterminated).
    DropEos,
    /// Remove the EOS and keep writing random post tokens up to `summary.max_tokens` (what
    /// the sampler returns when it is cut at the length limit).
    Overrun,
    /// Remove one of the post's top facts.
    DropFact,
    /// Replace one top fact by a lesser fact of the post not already named.
    SwapFact,
    /// Insert a lesser fact of the post not already named at a random place.
    AddLesserFact,
}

impl Perturbation {
    pub const ALL: [Perturbation; 7] = [
        Perturbation::Hallucinate,
        Perturbation::Repeat,
        Perturbation::DropEos,
        Perturbation::Overrun,
        Perturbation::DropFact,
        Perturbation::SwapFact,
        Perturbation::AddLesserFact,
    ];
}

impl Task {
    /// Apply `kind` to a response in sample form; the result is in sample form (EOS kept where
    /// the input had one, except for `DropEos` and `Overrun`; tokens after the EOS dropped).
    /// `None` when the perturbation does not apply (nothing to repeat, no EOS to drop, no top
    /// fact named, no lesser fact left, already at the limit without EOS).
    ///
    /// On a response that ended, every kind but `AddLesserFact` lowers the gold reward with the
    /// default weights (`AddLesserFact` costs only beyond `gold.length_budget`).
    pub fn perturb<R: Rng + ?Sized>(
        &self,
        post: &Post,
        sample: &[u32],
        kind: Perturbation,
        rng: &mut R,
    ) -> Option<Vec<u32>> {
        let eos_at = sample.iter().position(|&t| t == EOS);
        let mut w = sample[..eos_at.unwrap_or(sample.len())].to_vec();
        let mut keep_eos = eos_at.is_some();
        let top = self.top_facts(post);
        let unused_lesser: Vec<u32> = self
            .lesser_facts(post)
            .into_iter()
            .filter(|f| !w.contains(f))
            .collect();
        let top_at: Vec<usize> = (0..w.len()).filter(|&i| top.contains(&w[i])).collect();
        match kind {
            Perturbation::Hallucinate => {
                let absent: Vec<u32> = self
                    .fact_ids()
                    .chain(self.filler_ids())
                    .filter(|t| !post.tokens.contains(t))
                    .collect();
                let at = rng.random_range(0..=w.len());
                w.insert(at, *absent.choose(rng)?);
            }
            Perturbation::Repeat => {
                if w.is_empty() {
                    return None;
                }
                let i = rng.random_range(0..w.len());
                w.insert(i + 1, w[i]);
            }
            Perturbation::DropEos => {
                if !keep_eos {
                    return None;
                }
                keep_eos = false;
            }
            Perturbation::Overrun => {
                let limit = self.max_response_tokens();
                if !keep_eos && w.len() >= limit {
                    return None;
                }
                keep_eos = false;
                while w.len() < limit {
                    w.push(*post.tokens.choose(rng)?);
                }
            }
            Perturbation::DropFact => {
                w.remove(*top_at.choose(rng)?);
            }
            Perturbation::SwapFact => {
                let i = *top_at.choose(rng)?;
                w[i] = *unused_lesser.choose(rng)?;
            }
            Perturbation::AddLesserFact => {
                let f = *unused_lesser.choose(rng)?;
                let at = rng.random_range(0..=w.len());
                w.insert(at, f);
            }
        }
        if keep_eos {
            w.push(EOS);
        }
        Some(w)
    }

    /// Apply the first applicable of `kinds`, tried in random order: (kind used, result).
    pub fn perturb_any<R: Rng + ?Sized>(
        &self,
        post: &Post,
        sample: &[u32],
        kinds: &[Perturbation],
        rng: &mut R,
    ) -> Option<(Perturbation, Vec<u32>)> {
        let mut order = kinds.to_vec();
        order.shuffle(rng);
        order
            .into_iter()
            .find_map(|k| self.perturb(post, sample, k, rng).map(|s| (k, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::TaskConfig;
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn perturbations_do_what_they_say() {
        let t = Task::new(TaskConfig::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        for post in t.posts(300, 4) {
            let perfect = t.ended(&t.perfect_summary(&post));
            let base = t.gold_parts(&post, &perfect);
            let mut parts =
                |k| t.gold_parts(&post, &t.perturb(&post, &perfect, k, &mut rng).unwrap());
            assert_eq!(parts(Perturbation::Hallucinate).hallucinated, 1);
            assert_eq!(parts(Perturbation::Repeat).repeated, 1);
            let p = parts(Perturbation::DropEos);
            assert!(!p.ended && p.length == 3);
            let p = parts(Perturbation::Overrun);
            assert!(!p.ended && p.length == t.max_response_tokens() && p.hallucinated == 0);
            assert_eq!(parts(Perturbation::DropFact).covered, 2);
            let p = parts(Perturbation::SwapFact);
            assert!(p.covered == 2 && p.length == 3 && p.hallucinated == 0 && p.repeated == 0);
            let p = parts(Perturbation::AddLesserFact);
            assert!(p.covered == 3 && p.length == 4 && p.hallucinated == 0 && p.repeated == 0);
            assert!(base.ended && base.covered == 3);
            // Not applicable: nothing to repeat, no EOS to drop, no top fact to drop.
            assert!(
                t.perturb(&post, &[EOS], Perturbation::Repeat, &mut rng)
                    .is_none()
            );
            assert!(
                t.perturb(&post, &perfect[..3], Perturbation::DropEos, &mut rng)
                    .is_none()
            );
            let w = t.filler_ids().start;
            assert!(
                t.perturb(&post, &[w, EOS], Perturbation::DropFact, &mut rng)
                    .is_none()
            );
            let full: Vec<u32> = vec![w; t.max_response_tokens()];
            assert!(
                t.perturb(&post, &full, Perturbation::Overrun, &mut rng)
                    .is_none()
            );
        }
    }

    #[test]
    fn perturbations_lower_gold() {
        let t = Task::new(TaskConfig::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let data = t.sft_examples(2000, 6);
        let mut ref_sum = 0.0;
        let mut sums = [(0.0f64, 0usize); 7];
        for ex in &data {
            let reference = t.ended(&ex.reference);
            let g_ref = t.gold(&ex.post, &reference);
            ref_sum += g_ref;
            // A perfect summary is at least as good as its reference.
            let perfect = t.ended(&t.perfect_summary(&ex.post));
            assert!(t.gold(&ex.post, &perfect) >= g_ref - 1e-12);
            for src in [&reference, &perfect] {
                let g_src = t.gold(&ex.post, src);
                for (i, k) in Perturbation::ALL.into_iter().enumerate() {
                    let Some(p) = t.perturb(&ex.post, src, k, &mut rng) else {
                        continue;
                    };
                    let g = t.gold(&ex.post, &p);
                    if k != Perturbation::AddLesserFact {
                        assert!(g < g_src - 0.05, "{k:?}: {} -> {}", t.text(src), t.text(&p));
                    } else {
                        assert!(
                            g <= g_src + 1e-12,
                            "{k:?}: {} -> {}",
                            t.text(src),
                            t.text(&p)
                        );
                    }
                    if src == &reference {
                        sums[i].0 += g;
                        sums[i].1 += 1;
                    }
                }
            }
        }
        // References score highest on average against each family of their perturbations.
        let ref_mean = ref_sum / data.len() as f64;
        for (k, (s, n)) in Perturbation::ALL.iter().zip(sums) {
            assert!(n > 100, "{k:?} applied only {n} times");
            assert!(
                s / (n as f64) < ref_mean - 0.05,
                "{k:?}: {} vs references {ref_mean}",
                s / n as f64
            );
        }
        // Perfect summaries beat the references by as much as the noise costs: win rate
        // 0.5 + (imperfect fraction)/2 = 0.7 in expectation, within 4 binomial sd.
        let wins: f64 = data
            .iter()
            .map(|ex| {
                t.gold_win(
                    &ex.post,
                    &t.ended(&t.perfect_summary(&ex.post)),
                    &ex.reference,
                )
            })
            .sum::<f64>()
            / data.len() as f64;
        let sd = (0.4 * 0.6 / data.len() as f64).sqrt() / 2.0;
        assert!(
            (wins - 0.7).abs() < 4.0 * sd,
            "perfect-policy win rate {wins}"
        );
        // The references themselves tie with themselves.
        assert!(
            data.iter()
                .all(|ex| t.gold_win(&ex.post, &t.ended(&ex.reference), &ex.reference) == 0.5)
        );
    }

    #[test]
    fn perturb_any_uses_an_applicable_kind() {
        let t = Task::new(TaskConfig::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let post = t.posts(1, 0).remove(0);
        let kinds = [Perturbation::DropEos, Perturbation::Repeat];
        // [EOS] alone: DropEos applies, Repeat does not.
        let (k, s) = t.perturb_any(&post, &[EOS], &kinds, &mut rng).unwrap();
        assert_eq!((k, s), (Perturbation::DropEos, vec![]));
        assert!(t.perturb_any(&post, &[], &kinds, &mut rng).is_none());
    }
}
