//! The simulated labeler and preference pairs.
//!
//! Labeler reward r(y) = gold(y) + length_bias * length(y) + noise_sd * z, with z ~ N(0, 1)
//! drawn afresh for every candidate of every judgement; a is chosen with probability
//! sigmoid((r_a - r_b) / temperature) (Bradley-Terry). `length` is the number of scored
//! summary tokens ([`GoldParts::length`](super::GoldParts)), EOS not counted.

use super::gold::GOLD_TIE_TOL;
use super::{Post, Task};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// Which candidate the labeler prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Choice {
    A,
    B,
}

/// One labeler judgement, with the quantities it was drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Labeler rewards of a and b, noise included.
    pub reward_a: f64,
    pub reward_b: f64,
    /// Bradley-Terry probability of choosing a given these rewards.
    pub p_a: f64,
    pub choice: Choice,
}

/// A labeled preference pair. Responses are in words form (EOS removed, the scoring code
/// appends it, as for TL;DR); `*_ended` records whether the sample had ended with EOS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefPair {
    pub post: Post,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub chosen_ended: bool,
    pub rejected_ended: bool,
    pub gold_chosen: f64,
    pub gold_rejected: f64,
}

/// Counts from [`Task::preference_pairs`]. Fractions are over kept pairs (0 when none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub offered: usize,
    pub kept: usize,
    /// Pairs whose two responses had the same words (identical for training).
    pub dropped_identical: usize,
    /// Fraction where the chosen response has the strictly higher gold reward.
    pub chosen_higher_gold: f64,
    /// Fraction where both have the same gold reward.
    pub gold_tied: f64,
    /// Fraction where the chosen response has strictly more words.
    pub chosen_longer: f64,
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Standard normal CDF, through the complementary error function (Chebyshev fit, relative
/// error below 1.2e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.26551223,
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    ]
    .iter()
    .rev()
    .fold(0.0, |acc, c| c + t * acc);
    let erfc = t * (-z * z + poly).exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

impl Task {
    /// Bradley-Terry probability that a is chosen when the labeler rewards differ by `d`.
    fn bt_prob(&self, d: f64) -> f64 {
        let temp = self.config().labeler.temperature;
        if temp > 0.0 {
            sigmoid(d / temp)
        } else if d > 0.0 {
            1.0
        } else if d < 0.0 {
            0.0
        } else {
            0.5
        }
    }

    /// Labeler reward of a response (sample form) before noise: gold + length_bias * length.
    pub fn labeler_reward(&self, post: &Post, sample: &[u32]) -> f64 {
        let p = self.gold_parts(post, sample);
        p.total + self.config().labeler.length_bias * p.length as f64
    }

    /// Judge two responses (sample form). Always draws two normals and one uniform from `rng`,
    /// whatever the knobs, so changing a knob keeps the random stream aligned.
    pub fn judge<R: Rng + ?Sized>(
        &self,
        post: &Post,
        a: &[u32],
        b: &[u32],
        rng: &mut R,
    ) -> Judgement {
        let sd = self.config().labeler.noise_sd;
        let za: f64 = rng.sample(StandardNormal);
        let zb: f64 = rng.sample(StandardNormal);
        let u: f64 = rng.random();
        let reward_a = self.labeler_reward(post, a) + sd * za;
        let reward_b = self.labeler_reward(post, b) + sd * zb;
        let p_a = self.bt_prob(reward_a - reward_b);
        let choice = if u < p_a { Choice::A } else { Choice::B };
        Judgement {
            reward_a,
            reward_b,
            p_a,
            choice,
        }
    }

    /// Which of two responses (sample form) the labeler chooses.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        post: &Post,
        a: &[u32],
        b: &[u32],
        rng: &mut R,
    ) -> Choice {
        self.judge(post, a, b, rng).choice
    }

    /// Probability that the labeler chooses a, averaged over its noise (the difference of the
    /// two noises is N(0, 2 noise_sd^2); integrated numerically).
    pub fn label_prob(&self, post: &Post, a: &[u32], b: &[u32]) -> f64 {
        let l = &self.config().labeler;
        let d = self.labeler_reward(post, a) - self.labeler_reward(post, b);
        let s = l.noise_sd * std::f64::consts::SQRT_2;
        if s == 0.0 {
            return self.bt_prob(d);
        }
        if l.temperature == 0.0 {
            return normal_cdf(d / s);
        }
        // Simpson's rule over z in [-9, 9]; the step resolves the sigmoid's width temperature/s.
        let n = ((18.0 * 8.0 * s / l.temperature).ceil() as usize).clamp(400, 200_000) & !1;
        let h = 18.0 / n as f64;
        let f = |z: f64| sigmoid((d + s * z) / l.temperature) * (-0.5 * z * z).exp();
        let mut sum = f(-9.0) + f(9.0);
        for i in 1..n {
            sum += if i % 2 == 1 { 4.0 } else { 2.0 } * f(-9.0 + i as f64 * h);
        }
        (sum * h / 3.0 / (2.0 * std::f64::consts::PI).sqrt()).clamp(0.0, 1.0)
    }

    /// Label candidate pairs (post, a, b), a and b in sample form (e.g. two SFT samples).
    /// Pairs whose responses have the same words are dropped without drawing from `rng`.
    pub fn preference_pairs<R: Rng + ?Sized>(
        &self,
        candidates: impl IntoIterator<Item = (Post, Vec<u32>, Vec<u32>)>,
        rng: &mut R,
    ) -> (Vec<PrefPair>, PairStats) {
        let window = |s: &[u32]| -> (Vec<u32>, bool) {
            let (w, ended) = self.split_sample(s);
            (w[..w.len().min(self.max_response_tokens())].to_vec(), ended)
        };
        let (mut pairs, mut offered, mut dropped) = (Vec::new(), 0, 0);
        let (mut higher, mut tied, mut longer) = (0usize, 0usize, 0usize);
        for (post, a, b) in candidates {
            offered += 1;
            let (wa, ea) = window(&a);
            let (wb, eb) = window(&b);
            if wa == wb {
                dropped += 1;
                continue;
            }
            let (ga, gb) = (self.gold(&post, &a), self.gold(&post, &b));
            let pair = match self.choose(&post, &a, &b, rng) {
                Choice::A => PrefPair {
                    post,
                    chosen: wa,
                    rejected: wb,
                    chosen_ended: ea,
                    rejected_ended: eb,
                    gold_chosen: ga,
                    gold_rejected: gb,
                },
                Choice::B => PrefPair {
                    post,
                    chosen: wb,
                    rejected: wa,
                    chosen_ended: eb,
                    rejected_ended: ea,
                    gold_chosen: gb,
                    gold_rejected: ga,
                },
            };
            let d = pair.gold_chosen - pair.gold_rejected;
            higher += (d > GOLD_TIE_TOL) as usize;
            tied += (d.abs() <= GOLD_TIE_TOL) as usize;
            longer += (pair.chosen.len() > pair.rejected.len()) as usize;
            pairs.push(pair);
        }
        let kept = pairs.len();
        let frac = |c: usize| {
            if kept == 0 {
                0.0
            } else {
                c as f64 / kept as f64
            }
        };
        let stats = PairStats {
            offered,
            kept,
            dropped_identical: dropped,
            chosen_higher_gold: frac(higher),
            gold_tied: frac(tied),
            chosen_longer: frac(longer),
        };
        (pairs, stats)
    }

    /// Ids of a pair: (prompt, chosen words, rejected words). EOS is left to the scoring code.
    pub fn pair_ids(&self, pair: &PrefPair) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        (
            self.prompt_ids(&pair.post),
            pair.chosen.clone(),
            pair.rejected.clone(),
        )
    }

    /// Text of a pair: (prompt, chosen, rejected). EOS is left to the scoring code.
    pub fn pair_text(&self, pair: &PrefPair) -> (String, String, String) {
        (
            self.prompt_text(&pair.post),
            self.text(&pair.chosen),
            self.text(&pair.rejected),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Perturbation, TaskConfig};
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;

    fn task_with(f: impl FnOnce(&mut TaskConfig)) -> Task {
        let mut c = TaskConfig::default();
        f(&mut c);
        Task::new(c).unwrap()
    }

    /// Varied candidate pairs: references, perfect summaries and their perturbations.
    fn candidate_pairs(t: &Task, n: usize, seed: u64) -> Vec<(Post, Vec<u32>, Vec<u32>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n);
        for ex in t.sft_examples(n, seed) {
            let mut pool = vec![
                t.ended(&ex.reference),
                t.ended(&t.perfect_summary(&ex.post)),
            ];
            for k in Perturbation::ALL {
                let src = pool[rng.random_range(0..2)].clone();
                if let Some(p) = t.perturb(&ex.post, &src, k, &mut rng) {
                    pool.push(p);
                }
            }
            let a = pool.choose(&mut rng).unwrap().clone();
            let b = pool.choose(&mut rng).unwrap().clone();
            out.push((ex.post, a, b));
        }
        out
    }

    /// Sum over bins of (observed - expected)^2 / variance for Bernoulli outcomes with known
    /// probabilities, binned by probability. Returns (statistic, number of bins used).
    fn calibration_chi2(obs: &[(f64, bool)], n_bins: usize) -> (f64, usize) {
        let mut bins = vec![(0.0f64, 0.0f64, 0.0f64, 0usize); n_bins];
        for &(p, hit) in obs {
            let b = ((p * n_bins as f64) as usize).min(n_bins - 1);
            bins[b].0 += hit as u8 as f64;
            bins[b].1 += p;
            bins[b].2 += p * (1.0 - p);
            bins[b].3 += 1;
        }
        let used: Vec<_> = bins.iter().filter(|b| b.2 > 1.0).collect();
        (
            used.iter().map(|b| (b.0 - b.1).powi(2) / b.2).sum(),
            used.len(),
        )
    }

    // 99.9% quantile of chi-square with k degrees of freedom, k = 1..=10.
    const CHI2_999: [f64; 10] = [
        10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59,
    ];

    #[test]
    fn labels_follow_bradley_terry_probabilities() {
        let t = task_with(|_| {});
        let mut rng = StdRng::seed_from_u64(11);
        let pairs = candidate_pairs(&t, 6000, 5);
        let mut given_noise = Vec::new();
        let mut marginal = Vec::new();
        for (post, a, b) in &pairs {
            let j = t.judge(post, a, b, &mut rng);
            given_noise.push((j.p_a, j.choice == Choice::A));
            marginal.push((t.label_prob(post, a, b), j.choice == Choice::A));
        }
        for (name, obs) in [("given noise", &given_noise), ("marginal", &marginal)] {
            let (chi2, k) = calibration_chi2(obs, 10);
            assert!(k >= 8, "{name}: predictions spread over only {k} bins");
            // Threshold: the 99.9% quantile of chi-square with k degrees of freedom.
            assert!(
                chi2 < CHI2_999[k - 1],
                "{name}: chi2 {chi2:.1} over {k} bins"
            );
        }
        // The test has power: labels drawn at temperature 1 instead of 0.1 fail it.
        let hot = task_with(|c| c.labeler.temperature = 1.0);
        let mut rng = StdRng::seed_from_u64(11);
        let wrong: Vec<(f64, bool)> = pairs
            .iter()
            .map(|(post, a, b)| {
                (
                    t.label_prob(post, a, b),
                    hot.choose(post, a, b, &mut rng) == Choice::A,
                )
            })
            .collect();
        let (chi2, k) = calibration_chi2(&wrong, 10);
        assert!(
            chi2 > 10.0 * CHI2_999[k - 1],
            "miscalibrated labels should fail: chi2 {chi2:.1}"
        );
    }

    #[test]
    fn marginal_probability_limits() {
        let (t, post) = {
            let t = task_with(|_| {});
            let post = t.posts(1, 0).remove(0);
            (t, post)
        };
        let perfect = t.ended(&t.perfect_summary(&post));
        let mut longer = t.perfect_summary(&post);
        longer.push(t.lesser_facts(&post)[0]);
        let longer = t.ended(&longer);
        // Labeler rewards: 1 + 3 x 0.2 = 1.6 vs 0.9 + 4 x 0.2 = 1.7, so d = -0.1.
        assert!((t.label_prob(&post, &perfect, &perfect) - 0.5).abs() < 1e-9);
        let p = t.label_prob(&post, &perfect, &longer);
        assert!((p + t.label_prob(&post, &longer, &perfect) - 1.0).abs() < 1e-9);
        // E[sigmoid((-0.1 + 0.0707 z) / 0.1)], by a fine independent quadrature: 0.288427.
        assert!((p - 0.288427).abs() < 1e-5, "{p}");
        let quiet = task_with(|c| c.labeler.noise_sd = 0.0);
        let p0 = quiet.label_prob(&post, &perfect, &longer);
        assert!((p0 - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-12, "{p0}");
        // Temperature 0: P(-0.1 + N(0, 2 x 0.05^2) > 0) = Phi(-1.41421) = 0.0786496.
        let hard = task_with(|c| c.labeler.temperature = 0.0);
        let ph = hard.label_prob(&post, &perfect, &longer);
        assert!((ph - 0.0786496).abs() < 1e-6, "{ph}");
        assert!(
            (normal_cdf(1.0) - 0.841345).abs() < 1e-6
                && (normal_cdf(-2.0) - 0.0227501).abs() < 1e-6
        );
    }

    /// Pairs of equal gold where `long` has one more word: a perfect summary missing one top fact
    /// (2 words, coverage 2/3) vs the same plus a lesser fact (3 words, still within budget).
    fn equal_gold_pairs(t: &Task, n: usize) -> Vec<(Post, Vec<u32>, Vec<u32>)> {
        let mut rng = StdRng::seed_from_u64(3);
        t.posts(n, 21)
            .into_iter()
            .map(|post| {
                let mut short = t.perfect_summary(&post);
                short.remove(rng.random_range(0..short.len()));
                let mut long = short.clone();
                long.push(*t.lesser_facts(&post).choose(&mut rng).unwrap());
                (post, t.ended(&long), t.ended(&short))
            })
            .collect()
    }

    #[test]
    fn verbosity_bias_prefers_longer_at_equal_gold() {
        let n = 3000;
        let sd = (0.25 / n as f64).sqrt();
        for bias in [0.0, 0.2] {
            let t = task_with(|c| c.labeler.length_bias = bias);
            let pairs = equal_gold_pairs(&t, n);
            assert!(
                pairs
                    .iter()
                    .all(|(p, l, s)| (t.gold(p, l) - t.gold(p, s)).abs() < 1e-12)
            );
            let mut rng = StdRng::seed_from_u64(4);
            let long_rate = pairs
                .iter()
                .filter(|(p, l, s)| t.choose(p, l, s, &mut rng) == Choice::A)
                .count() as f64
                / n as f64;
            if bias == 0.0 {
                // No bias: a fair coin; |z| < 4 (two-sided, p about 6e-5).
                assert!(
                    (long_rate - 0.5).abs() < 4.0 * sd,
                    "bias 0: rate {long_rate}"
                );
            } else {
                // Bias 0.2 per word, one word more: the rate label_prob predicts (about 0.86,
                // the same for every pair), within 4 standard deviations; far above 0.5.
                let want = t.label_prob(&pairs[0].0, &pairs[0].1, &pairs[0].2);
                assert!(
                    want > 0.8 && (long_rate - want).abs() < 4.0 * sd,
                    "rate {long_rate} vs {want}"
                );
            }
        }
    }

    #[test]
    fn preference_pairs_drop_identical_and_count() {
        let t = task_with(|_| {});
        let mut cands = candidate_pairs(&t, 600, 8);
        // Identical words: the same sample twice, and a sample vs its words plus trailing junk.
        let post = cands[0].0.clone();
        let s = t.ended(&t.perfect_summary(&post));
        let mut s_junk = s.clone();
        s_junk.extend([7, 8]);
        cands.push((post.clone(), s.clone(), s.clone()));
        cands.push((post.clone(), s.clone(), s_junk));
        let identical = cands
            .iter()
            .filter(|(_, a, b)| t.split_sample(a).0 == t.split_sample(b).0)
            .count();
        let mut rng = StdRng::seed_from_u64(1);
        let (pairs, stats) = t.preference_pairs(cands.clone(), &mut rng);
        assert_eq!(stats.offered, cands.len());
        assert_eq!(stats.dropped_identical, identical);
        assert_eq!(stats.kept, pairs.len());
        assert_eq!(stats.kept + stats.dropped_identical, stats.offered);
        let higher = pairs
            .iter()
            .filter(|p| p.gold_chosen > p.gold_rejected + 1e-9)
            .count() as f64;
        assert!((stats.chosen_higher_gold - higher / pairs.len() as f64).abs() < 1e-12);
        assert!(stats.chosen_higher_gold > 0.6, "{stats:?}");
        for p in &pairs {
            assert_ne!(p.chosen, p.rejected);
            assert!(
                !p.chosen.contains(&super::super::EOS) && !p.rejected.contains(&super::super::EOS)
            );
            let (prompt, c, r) = t.pair_ids(p);
            assert_eq!(prompt, t.prompt_ids(&p.post));
            assert_eq!(
                (c.as_slice(), r.as_slice()),
                (p.chosen.as_slice(), p.rejected.as_slice())
            );
            let chosen_sample = if p.chosen_ended {
                t.ended(&p.chosen)
            } else {
                p.chosen.clone()
            };
            assert!((t.gold(&p.post, &chosen_sample) - p.gold_chosen).abs() < 1e-12);
        }
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            t.preference_pairs(cands, &mut rng),
            (pairs, stats),
            "same seed, same labels"
        );
    }
}
