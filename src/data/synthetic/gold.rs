//! The exact gold reward and the gold win against a reference.

use super::{Post, Task};
use serde::{Deserialize, Serialize};

/// Gold rewards closer than this count as equal (the weights are decimals, so sums that are
/// equal on paper can differ in the last bits).
pub const GOLD_TIE_TOL: f64 = 1e-9;

/// The parts of the gold reward of one response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldParts {
    /// Top facts of the post (`summary.top_facts` for generated posts).
    pub n_top: usize,
    /// Top facts the summary names.
    pub covered: usize,
    /// Summary tokens scored: those before the first EOS, at most `summary.max_tokens`.
    pub length: usize,
    /// Scored tokens absent from the post (special and out-of-vocabulary ids included).
    pub hallucinated: usize,
    /// Scored tokens that repeat an earlier one.
    pub repeated: usize,
    /// Scored tokens beyond `gold.length_budget`.
    pub over_budget: usize,
    /// An EOS came within the first `summary.max_tokens` tokens.
    pub ended: bool,
    /// The gold reward.
    pub total: f64,
}

impl Task {
    /// Gold reward of a response in sample form (words, then EOS if it ended), with its parts.
    ///
    /// Tokens after the first EOS are ignored; a response without EOS in its first
    /// `summary.max_tokens` tokens is cut there and pays `gold.unterminated`.
    pub fn gold_parts(&self, post: &Post, sample: &[u32]) -> GoldParts {
        let g = &self.config().gold;
        let (mut words, ended) = self.split_sample(sample);
        if !ended {
            words = &words[..words.len().min(self.max_response_tokens())];
        }
        let top = self.top_facts(post);
        let covered = top.iter().filter(|f| words.contains(f)).count();
        let hallucinated = words.iter().filter(|t| !post.tokens.contains(t)).count();
        let repeated = (0..words.len())
            .filter(|&i| words[..i].contains(&words[i]))
            .count();
        let over_budget = words.len().saturating_sub(g.length_budget);
        let coverage = if top.is_empty() {
            0.0
        } else {
            g.coverage * covered as f64 / top.len() as f64
        };
        let total = coverage
            - g.hallucination * hallucinated as f64
            - g.repetition * repeated as f64
            - g.over_budget * over_budget as f64
            - if ended { 0.0 } else { g.unterminated };
        GoldParts {
            n_top: top.len(),
            covered,
            length: words.len(),
            hallucinated,
            repeated,
            over_budget,
            ended,
            total,
        }
    }

    /// Gold reward of a response in sample form (see [`Task::gold_parts`]).
    pub fn gold(&self, post: &Post, sample: &[u32]) -> f64 {
        self.gold_parts(post, sample).total
    }

    /// Gold reward of a summary in words form (a reference, a pair response): scored as if EOS
    /// followed it, which is how the model is trained on it.
    pub fn gold_words(&self, post: &Post, words: &[u32]) -> f64 {
        self.gold(post, &self.ended(words))
    }

    /// 1 if the sample (sample form) beats the reference (words form) on gold reward, 0 if it
    /// loses, 0.5 on a tie (within [`GOLD_TIE_TOL`]).
    pub fn gold_win(&self, post: &Post, sample: &[u32], reference: &[u32]) -> f64 {
        let d = self.gold(post, sample) - self.gold_words(post, reference);
        if d > GOLD_TIE_TOL {
            1.0
        } else if d < -GOLD_TIE_TOL {
            0.0
        } else {
            0.5
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EOS, PAD, SEP, TaskConfig};
    use super::*;

    /// A post whose facts f0..f4 have a known order: importance is set by the world, so look
    /// it up and build the post from the five most important facts of the vocabulary.
    fn fixture() -> (Task, Post, Vec<u32>) {
        let t = Task::new(TaskConfig::default()).unwrap();
        let mut facts: Vec<u32> = t.fact_ids().collect();
        facts.sort_by(|a, b| {
            t.importance(*b)
                .unwrap()
                .total_cmp(&t.importance(*a).unwrap())
        });
        let (f, w) = (&facts[..5], t.filler_ids().start);
        // fillers w0, w1; facts in scrambled order.
        let post = Post {
            tokens: vec![w, f[3], f[1], w + 1, f[0], w, f[4], f[2], w, w + 1],
        };
        (t, post, f.to_vec())
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_values() {
        let (t, post, f) = fixture();
        let w = t.filler_ids().start;
        let absent = t.fact_ids().find(|x| !post.tokens.contains(x)).unwrap();
        assert_eq!(t.perfect_summary(&post), f[..3].to_vec());
        let cases: Vec<(Vec<u32>, f64)> = vec![
            (vec![f[0], f[1], f[2], EOS], 1.0),
            (vec![f[2], f[0], f[1], EOS], 1.0), // order does not matter
            (vec![f[0], f[1], EOS], 2.0 / 3.0),
            (vec![f[0], f[1], f[3], EOS], 2.0 / 3.0),
            (vec![f[0], f[1], f[2], w, EOS], 0.9),
            (vec![f[0], f[1], f[2], f[3], f[4], EOS], 0.8),
            (vec![f[0], f[1], f[2], absent, EOS], 1.0 - 0.5 - 0.1),
            (vec![f[0], f[1], f[2], f[0], EOS], 1.0 - 0.3 - 0.1),
            (vec![f[0], f[1], f[2]], 0.0), // no EOS
            (vec![EOS], 0.0),
            (vec![], -1.0),
            (vec![f[0], f[1], f[2], EOS, absent, absent], 1.0), // after EOS: ignored
            (vec![f[0], SEP, PAD, 999, EOS], 1.0 / 3.0 - 1.5 - 0.1),
        ];
        for (sample, want) in cases {
            let got = t.gold(&post, &sample);
            assert!(close(got, want), "{}: {got} vs {want}", t.text(&sample));
        }
    }

    #[test]
    fn the_length_limit_cuts_and_penalizes() {
        let (t, post, f) = fixture();
        let w = t.filler_ids().start;
        // 9 words + EOS = 10 tokens: ended.
        let mut nine = vec![f[0], f[1], f[2]];
        nine.extend([w; 6]);
        let p = t.gold_parts(&post, &t.ended(&nine));
        assert!(p.ended && p.length == 9 && p.repeated == 5 && p.over_budget == 6);
        assert!(close(p.total, 1.0 - 1.5 - 0.6));
        // 10 words then EOS: the EOS comes too late; the first 10 tokens are scored.
        let mut ten = nine.clone();
        ten.push(f[3]);
        let p = t.gold_parts(&post, &t.ended(&ten));
        assert!(!p.ended && p.length == 10);
        assert!(close(p.total, 1.0 - 1.5 - 0.7 - 1.0));
        // A run-on sample: only the window counts.
        let mut long = ten.clone();
        long.extend([f[4]; 20]);
        assert_eq!(t.gold_parts(&post, &long), p);
        assert!(close(t.gold_words(&post, &ten), p.total));
    }

    #[test]
    fn wins_ties_and_losses() {
        let (t, post, f) = fixture();
        let w = t.filler_ids().start;
        let perfect = vec![f[0], f[1], f[2]];
        assert_eq!(t.gold_win(&post, &t.ended(&perfect), &perfect), 0.5);
        assert_eq!(t.gold_win(&post, &t.ended(&perfect), &[f[0], f[1]]), 1.0);
        assert_eq!(
            t.gold_win(&post, &perfect, &perfect),
            0.0,
            "an unended sample loses"
        );
        // Equal on paper, unequal in floating point: 1 - 0.3 (one repeat) vs 1 - 3 x 0.1.
        let a = t.ended(&[f[0], f[1], f[2], f[0]]); // 1 - 0.3 - 0.1
        let b = [f[0], f[1], f[2], w, w + 1, f[3], f[4]]; // 1 - 4 x 0.1
        assert_eq!(t.gold_win(&post, &a, &b), 0.5);
    }
}
