//! The tree MDP of the paper's section 4 / Appendix E.
//!
//! One start state `s1`, three actions `a0, a1, a2`, deterministic transitions that append the
//! action to the history (a tree), depth 3. The decision states are numbered as in the paper's
//! Figure 6: `s1` is the root, `s2..s4` follow `a0..a2`, and `s5..s13` follow the nine
//! two-action prefixes (`s5` = after `a0 a0`, `s9` = after `a1 a1`, `s13` = after `a2 a2`).
//! The nine depth-2 states are the leaves: whatever action is taken there, the MDP moves to the
//! absorbing terminal state `s_inf`. A trajectory is therefore a sequence of exactly three
//! actions, and there are 27 of them.

use serde::Serialize;
use std::fmt;

/// Actions per state.
pub const N_ACTIONS: usize = 3;
/// Actions per trajectory (the tree's depth).
pub const DEPTH: usize = 3;
/// Number of complete trajectories, `N_ACTIONS ^ DEPTH`.
pub const N_TRAJ: usize = 27;
/// Number of decision states `s1..s13` (the absorbing `s_inf` not counted).
pub const N_STATES: usize = 13;

/// A state of the MDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum State {
    /// A decision state, numbered 1..=13 as in the paper.
    Node(usize),
    /// The absorbing terminal state `s_inf`.
    Terminal,
}

impl State {
    /// The start state `s1`.
    pub const START: State = State::Node(1);

    /// Depth of a decision state (0 for `s1`, 1 for `s2..s4`, 2 for `s5..s13`).
    pub fn depth(self) -> Option<usize> {
        match self {
            State::Node(1) => Some(0),
            State::Node(n) if (2..=4).contains(&n) => Some(1),
            State::Node(n) if (5..=13).contains(&n) => Some(2),
            _ => None,
        }
    }

    /// The action history that leads from `s1` to this decision state.
    pub fn prefix(self) -> Option<Vec<usize>> {
        match self {
            State::Node(1) => Some(vec![]),
            State::Node(n) if (2..=4).contains(&n) => Some(vec![n - 2]),
            State::Node(n) if (5..=13).contains(&n) => Some(vec![(n - 5) / 3, (n - 5) % 3]),
            _ => None,
        }
    }

    /// The decision state reached by an action history of length 0, 1 or 2.
    pub fn from_prefix(prefix: &[usize]) -> Option<State> {
        if prefix.iter().any(|&a| a >= N_ACTIONS) {
            return None;
        }
        match prefix {
            [] => Some(State::Node(1)),
            [a] => Some(State::Node(2 + a)),
            [a, b] => Some(State::Node(5 + 3 * a + b)),
            _ => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Node(n) => write!(f, "s{n}"),
            State::Terminal => write!(f, "s_inf"),
        }
    }
}

/// The deterministic transition function. Leaves (depth-2 states) and the terminal state go to
/// the terminal state whatever the action; an action index >= 3 is an error.
pub fn transition(state: State, action: usize) -> anyhow::Result<State> {
    anyhow::ensure!(
        action < N_ACTIONS,
        "action a{action} does not exist (3 actions)"
    );
    match state {
        State::Terminal => Ok(State::Terminal),
        s => {
            let mut p = s
                .prefix()
                .ok_or_else(|| anyhow::anyhow!("state {s} does not exist"))?;
            if p.len() == DEPTH - 1 {
                Ok(State::Terminal)
            } else {
                p.push(action);
                Ok(State::from_prefix(&p).expect("prefix shorter than the depth"))
            }
        }
    }
}

/// A complete trajectory: three actions from `s1` to `s_inf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Trajectory(pub [usize; DEPTH]);

impl Trajectory {
    /// The preferred trajectory of the single preference, `(a1, a1, a0)`.
    pub const PREFERRED: Trajectory = Trajectory([1, 1, 0]);
    /// The dispreferred trajectory, `(a0, a0, a0)`.
    pub const DISPREFERRED: Trajectory = Trajectory([0, 0, 0]);
    /// The third demonstration, `(a2, a2, a2)`, that the preference never mentions.
    pub const THIRD_DEMO: Trajectory = Trajectory([2, 2, 2]);
    /// The three SFT demonstrations.
    pub const DEMOS: [Trajectory; 3] = [Self::DISPREFERRED, Self::PREFERRED, Self::THIRD_DEMO];

    /// Index in the enumeration order `9*a + 3*b + c` (0..27).
    pub fn index(self) -> usize {
        let [a, b, c] = self.0;
        9 * a + 3 * b + c
    }

    /// The trajectory with enumeration index `i` (panics for `i >= 27`).
    pub fn from_index(i: usize) -> Trajectory {
        assert!(i < N_TRAJ, "trajectory index {i} out of range 0..27");
        Trajectory([i / 9, (i / 3) % 3, i % 3])
    }

    /// Short label, e.g. `a1a1a0`.
    pub fn label(self) -> String {
        self.0.iter().map(|a| format!("a{a}")).collect()
    }

    /// Parse a label written by [`Trajectory::label`].
    pub fn parse(s: &str) -> anyhow::Result<Trajectory> {
        let b = s.as_bytes();
        anyhow::ensure!(
            b.len() == 2 * DEPTH
                && (0..DEPTH).all(|i| b[2 * i] == b'a' && (b'0'..=b'2').contains(&b[2 * i + 1])),
            "bad trajectory label {s:?}: expected e.g. a1a1a0"
        );
        Ok(Trajectory(
            [0, 1, 2].map(|i| (b[2 * i + 1] - b'0') as usize),
        ))
    }

    /// The states visited: `s1`, the two intermediate states, and `s_inf`.
    pub fn states(self) -> [State; DEPTH + 1] {
        let mut out = [State::START; DEPTH + 1];
        for t in 0..DEPTH {
            out[t + 1] = transition(out[t], self.0[t]).expect("valid action");
        }
        out
    }

    /// Which group of the summary tables this trajectory belongs to.
    pub fn group(self) -> Group {
        if self == Self::PREFERRED {
            Group::Preferred
        } else if self == Self::DISPREFERRED {
            Group::Dispreferred
        } else if self == Self::THIRD_DEMO {
            Group::ThirdDemo
        } else {
            Group::Ood
        }
    }
}

impl fmt::Display for Trajectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl Serialize for Trajectory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// All 27 trajectories in enumeration order.
pub fn all_trajectories() -> [Trajectory; N_TRAJ] {
    std::array::from_fn(Trajectory::from_index)
}

/// The trajectory groups of the summary tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// `(a1, a1, a0)`.
    Preferred,
    /// `(a0, a0, a0)`.
    Dispreferred,
    /// `(a2, a2, a2)`: a demonstration outside the preference.
    ThirdDemo,
    /// The 24 trajectories in no demonstration (out of distribution).
    Ood,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::Preferred,
        Group::Dispreferred,
        Group::ThirdDemo,
        Group::Ood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Group::Preferred => "preferred",
            Group::Dispreferred => "dispreferred",
            Group::ThirdDemo => "third_demo",
            Group::Ood => "ood",
        }
    }
}

/// Probability mass per group (the four sum to the total mass, 1 for a policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GroupMass {
    pub preferred: f64,
    pub dispreferred: f64,
    pub third_demo: f64,
    pub ood: f64,
}

impl GroupMass {
    /// Sum the probabilities of the 27 trajectories (in enumeration order) by group.
    pub fn from_probs(probs: &[f64]) -> GroupMass {
        assert_eq!(probs.len(), N_TRAJ, "expected 27 trajectory probabilities");
        let mut m = GroupMass::default();
        for (i, &p) in probs.iter().enumerate() {
            *m.get_mut(Trajectory::from_index(i).group()) += p;
        }
        m
    }

    pub fn get(&self, g: Group) -> f64 {
        match g {
            Group::Preferred => self.preferred,
            Group::Dispreferred => self.dispreferred,
            Group::ThirdDemo => self.third_demo,
            Group::Ood => self.ood,
        }
    }

    fn get_mut(&mut self, g: Group) -> &mut f64 {
        match g {
            Group::Preferred => &mut self.preferred,
            Group::Dispreferred => &mut self.dispreferred,
            Group::ThirdDemo => &mut self.third_demo,
            Group::Ood => &mut self.ood,
        }
    }

    /// Mass on the three demonstrations.
    pub fn in_distribution(&self) -> f64 {
        self.preferred + self.dispreferred + self.third_demo
    }
}

/// The out-of-distribution trajectory holding the most probability, with its probability.
pub fn top_ood(probs: &[f64]) -> (Trajectory, f64) {
    assert_eq!(probs.len(), N_TRAJ, "expected 27 trajectory probabilities");
    let mut best = (Trajectory([0, 0, 1]), f64::NEG_INFINITY);
    for (i, &p) in probs.iter().enumerate() {
        let t = Trajectory::from_index(i);
        if t.group() == Group::Ood && p > best.1 {
            best = (t, p);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_shape_and_paper_numbering() {
        let all = all_trajectories();
        assert_eq!(all.len(), 27);
        for (i, t) in all.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(Trajectory::parse(&t.label()).unwrap(), *t);
            let s = t.states();
            assert_eq!(s[0], State::START);
            assert_eq!(s[3], State::Terminal);
            assert_eq!(s[1].depth(), Some(1));
            assert_eq!(s[2].depth(), Some(2));
        }
        // the paper's state names for the three demonstrations
        assert_eq!(
            Trajectory::DISPREFERRED.states()[1..3],
            [State::Node(2), State::Node(5)]
        );
        assert_eq!(
            Trajectory::PREFERRED.states()[1..3],
            [State::Node(3), State::Node(9)]
        );
        assert_eq!(
            Trajectory::THIRD_DEMO.states()[1..3],
            [State::Node(4), State::Node(13)]
        );
        // every decision state is reached, the terminal state absorbs
        let mut seen = std::collections::HashSet::new();
        for t in all {
            seen.extend(t.states());
        }
        assert_eq!(seen.len(), N_STATES + 1);
        for a in 0..3 {
            assert_eq!(transition(State::Terminal, a).unwrap(), State::Terminal);
            assert_eq!(transition(State::Node(13), a).unwrap(), State::Terminal);
        }
        assert!(transition(State::START, 3).is_err());
        assert!(Trajectory::parse("a1a3a0").is_err());
        let groups: Vec<Group> = all.iter().map(|t| t.group()).collect();
        assert_eq!(groups.iter().filter(|&&g| g == Group::Ood).count(), 24);
    }

    #[test]
    fn group_mass_and_top_ood() {
        let mut p = vec![0.0; 27];
        p[Trajectory::PREFERRED.index()] = 0.5;
        p[Trajectory::parse("a1a1a1").unwrap().index()] = 0.3;
        p[Trajectory::parse("a2a0a0").unwrap().index()] = 0.2;
        let m = GroupMass::from_probs(&p);
        assert_eq!((m.preferred, m.ood), (0.5, 0.5));
        assert_eq!(m.in_distribution(), 0.5);
        assert_eq!(top_ood(&p), (Trajectory([1, 1, 1]), 0.3));
    }
}
