//! Pairwise judging: does a judge prefer a candidate summary (a policy sample) over the
//! dataset's reference summary for the same post?
//!
//! The paper's protocol (SPEC section 1): a GPT-4 judge sees the post and the two summaries,
//! labelled "A" and "B" in an order drawn at random per comparison, gives a one-sentence
//! comparison and then a line `Preferred: A` or `Preferred: B`. The answer is mapped back through
//! the order to a score for the candidate (1 win, 0 loss, 0.5 tie).
//!
//! * [`Judge`] is the batched interface; [`JudgeReport`] holds one [`Verdict`] per item, in
//!   input order, plus a [`JudgeSummary`].
//! * [`OpenAiJudge`] talks to any OpenAI-compatible chat-completions server, with an on-disk
//!   cache of replies ([`cache::VerdictCache`]), retries with capped, jittered exponential
//!   backoff, and a bounded worker pool.
//! * [`prompt`] holds the judging prompt, the random order and the reply parser.
//!
//! Counting rules of the summary: the win rate is over *decided* comparisons only (wins, losses
//! and ties, a tie counting 0.5); unparseable replies and failed requests are excluded from the
//! rate but always counted and reported. Its 95% interval is the Wilson score interval with the
//! fractional success count (wins + ties/2) over the decided comparisons.

pub mod cache;
pub mod gold;
pub mod openai;
pub mod prompt;

pub use openai::{ApiKey, OpenAiJudge, OpenAiJudgeConfig};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// One comparison to judge: `candidate` (e.g. a policy sample) against `reference` (e.g. the
/// dataset's summary) for the post in `prompt`. `id` must be unique within a batch; it also
/// seeds the presentation order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeItem {
    pub id: String,
    pub prompt: String,
    pub candidate: String,
    pub reference: String,
}

/// A position in the prompt as the judge saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Position {
    A,
    B,
}

/// How a comparison ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictStatus {
    /// The judge's reply gave a preference (or a tie): `candidate_score` is set.
    Decided,
    /// The judge replied, but no preference could be read from the reply.
    Unparseable,
    /// No usable reply: a non-retryable HTTP status, retries exhausted, or a malformed response.
    Failed,
}

/// Tokens billed for one reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Per-1k-token prices used to turn token counts into a cost (0 when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Prices {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

impl Prices {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64) * self.prompt_per_1k / 1000.0
            + (completion_tokens as f64) * self.completion_per_1k / 1000.0
    }
}

/// The outcome of one comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The item's id.
    pub id: String,
    pub status: VerdictStatus,
    /// 1 win, 0 loss, 0.5 tie for the candidate; `None` when unparseable or failed.
    pub candidate_score: Option<f64>,
    /// True when the candidate was shown as summary B (the reference as A).
    pub flipped: bool,
    /// The position the judge preferred, as shown; `None` for ties, unparseable, failed.
    pub preferred: Option<Position>,
    /// The judge's reply text, when there was one.
    pub reply: Option<String>,
    /// What went wrong, for failed (and unparseable) comparisons.
    pub error: Option<String>,
    /// The last HTTP status of a failed comparison, when there was one.
    pub http_status: Option<u16>,
    /// Tokens billed for the reply (also for cached replies: what they cost when fetched).
    pub usage: Usage,
    /// True when no request was made for this verdict: the reply came from the cache, or from an
    /// identical comparison earlier in the same batch.
    pub cached: bool,
    /// HTTP requests made for this verdict in this run (retries included).
    pub requests: u32,
    /// The model name the server reported in its reply (e.g. the snapshot behind an alias).
    #[serde(default)]
    pub response_model: Option<String>,
}

impl Verdict {
    /// A verdict from a judge's reply text: the `Preferred:` line is parsed with
    /// [`prompt::parse_preferred`] and mapped back through the order.
    pub fn from_reply(id: &str, flipped: bool, reply: String, usage: Usage) -> Verdict {
        let preferred = prompt::parse_preferred(&reply);
        let (status, score, error) = match preferred {
            Some(p) => (
                VerdictStatus::Decided,
                Some(candidate_score(p, flipped)),
                None,
            ),
            None => (
                VerdictStatus::Unparseable,
                None,
                Some("no parseable `Preferred: A|B` line in the reply".to_string()),
            ),
        };
        Verdict {
            id: id.to_string(),
            status,
            candidate_score: score,
            flipped,
            preferred,
            reply: Some(reply),
            error,
            http_status: None,
            usage,
            cached: false,
            requests: 0,
            response_model: None,
        }
    }

    /// A failed comparison.
    pub fn failed(id: &str, flipped: bool, error: String, http_status: Option<u16>) -> Verdict {
        Verdict {
            id: id.to_string(),
            status: VerdictStatus::Failed,
            candidate_score: None,
            flipped,
            preferred: None,
            reply: None,
            error: Some(error),
            http_status,
            usage: Usage::default(),
            cached: false,
            requests: 0,
            response_model: None,
        }
    }
}

/// The candidate's score when the judge preferred `preferred` and the order was `flipped`
/// (candidate shown as B).
pub fn candidate_score(preferred: Position, flipped: bool) -> f64 {
    let candidate_shown = if flipped { Position::B } else { Position::A };
    if preferred == candidate_shown {
        1.0
    } else {
        0.0
    }
}

/// Statistics of the presentation order: a judge without position bias prefers A half the time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionBias {
    /// Replies preferring the summary shown as A / as B.
    pub shown_a_preferred: usize,
    pub shown_b_preferred: usize,
    /// shown_a_preferred / (shown_a_preferred + shown_b_preferred), with its Wilson 95% interval.
    pub shown_a_rate: Option<f64>,
    pub shown_a_rate_ci95: Option<[f64; 2]>,
    /// Decided comparisons with the candidate shown as A (not flipped) / as B (flipped), and
    /// the candidate's win rate in each (ties 0.5).
    pub decided_candidate_a: usize,
    pub decided_candidate_b: usize,
    pub win_rate_candidate_a: Option<f64>,
    pub win_rate_candidate_b: Option<f64>,
}

/// Aggregate of a batch of verdicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSummary {
    /// Number of verdicts (one per item).
    pub n: usize,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    pub unparseable: usize,
    pub failed: usize,
    /// wins + losses + ties: the denominator of the win rate.
    pub decided: usize,
    /// (wins + ties/2) / decided; `None` when nothing was decided.
    pub win_rate: Option<f64>,
    /// 95% interval of the win rate.
    pub win_rate_ci95: Option<[f64; 2]>,
    /// How the interval was computed.
    pub interval_method: String,
    pub position_bias: PositionBias,
    /// Tokens and cost of all replies behind the verdicts (cached ones at their original cost).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    /// Tokens and cost of the replies fetched in this run (no cache hits).
    pub paid_prompt_tokens: u64,
    pub paid_completion_tokens: u64,
    pub paid_cost: f64,
    /// HTTP requests made in this run (retries included) and verdicts served without a request.
    pub requests: u64,
    pub cache_hits: usize,
    pub prices: Prices,
    /// The distinct model names the server reported behind the replies, sorted.
    #[serde(default)]
    pub response_models: Vec<String>,
}

/// 1.959964: the two-sided 95% normal quantile.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval for `successes` (may be fractional) out of `n` at normal
/// quantile `z`; `None` when `n` is 0.
pub fn wilson_interval(successes: f64, n: f64, z: f64) -> Option<[f64; 2]> {
    if n <= 0.0 {
        return None;
    }
    let p = (successes / n).clamp(0.0, 1.0);
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

impl JudgeSummary {
    /// Aggregate verdicts. Each verdict is counted exactly once, under its status.
    pub fn from_verdicts(verdicts: &[Verdict], prices: Prices) -> JudgeSummary {
        let (mut wins, mut losses, mut ties, mut unparseable, mut failed) = (0, 0, 0, 0, 0);
        let (mut shown_a, mut shown_b) = (0usize, 0usize);
        let (mut dec_a, mut dec_b, mut score_a, mut score_b) = (0usize, 0usize, 0.0f64, 0.0f64);
        let (mut pt, mut ct, mut paid_pt, mut paid_ct) = (0u64, 0u64, 0u64, 0u64);
        let (mut requests, mut cache_hits) = (0u64, 0usize);
        for v in verdicts {
            match (v.status, v.candidate_score) {
                (VerdictStatus::Decided, Some(s)) => {
                    if s > 0.5 {
                        wins += 1;
                    } else if s < 0.5 {
                        losses += 1;
                    } else {
                        ties += 1;
                    }
                    if v.flipped {
                        dec_b += 1;
                        score_b += s;
                    } else {
                        dec_a += 1;
                        score_a += s;
                    }
                }
                (VerdictStatus::Decided, None) | (VerdictStatus::Unparseable, _) => {
                    unparseable += 1
                }
                (VerdictStatus::Failed, _) => failed += 1,
            }
            match v.preferred {
                Some(Position::A) => shown_a += 1,
                Some(Position::B) => shown_b += 1,
                None => {}
            }
            pt += v.usage.prompt_tokens;
            ct += v.usage.completion_tokens;
            if !v.cached {
                paid_pt += v.usage.prompt_tokens;
                paid_ct += v.usage.completion_tokens;
            } else {
                cache_hits += 1;
            }
            requests += u64::from(v.requests);
        }
        let response_models: std::collections::BTreeSet<String> = verdicts
            .iter()
            .filter_map(|v| v.response_model.clone())
            .collect();
        let decided = wins + losses + ties;
        let successes = wins as f64 + 0.5 * ties as f64;
        let rate = |s: f64, n: usize| (n > 0).then(|| s / n as f64);
        let shown = shown_a + shown_b;
        JudgeSummary {
            n: verdicts.len(),
            wins,
            losses,
            ties,
            unparseable,
            failed,
            decided,
            win_rate: rate(successes, decided),
            win_rate_ci95: wilson_interval(successes, decided as f64, Z95),
            interval_method:
                "Wilson score 95% over decided comparisons (wins + ties/2 successes); \
                              unparseable and failed excluded"
                    .to_string(),
            position_bias: PositionBias {
                shown_a_preferred: shown_a,
                shown_b_preferred: shown_b,
                shown_a_rate: rate(shown_a as f64, shown),
                shown_a_rate_ci95: wilson_interval(shown_a as f64, shown as f64, Z95),
                decided_candidate_a: dec_a,
                decided_candidate_b: dec_b,
                win_rate_candidate_a: rate(score_a, dec_a),
                win_rate_candidate_b: rate(score_b, dec_b),
            },
            prompt_tokens: pt,
            completion_tokens: ct,
            cost: prices.cost(pt, ct),
            paid_prompt_tokens: paid_pt,
            paid_completion_tokens: paid_ct,
            paid_cost: prices.cost(paid_pt, paid_ct),
            requests,
            cache_hits,
            prices,
            response_models: response_models.into_iter().collect(),
        }
    }
}

/// The result of judging a batch: one verdict per item, in input order, and their summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    pub verdicts: Vec<Verdict>,
    pub summary: JudgeSummary,
}

/// A batched pairwise judge.
pub trait Judge {
    /// Judge every item; the report has exactly one verdict per item, in input order. Per-item
    /// problems (HTTP errors, unparseable replies) become verdicts; `Err` is for problems with
    /// the batch as a whole (duplicate ids, an unusable cache directory).
    fn judge(&self, items: &[JudgeItem]) -> Result<JudgeReport>;
}

/// Reject batches whose ids are not unique (each id names exactly one verdict).
pub fn check_unique_ids(items: &[JudgeItem]) -> Result<()> {
    let mut seen = HashSet::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        if !seen.insert(it.id.as_str()) {
            bail!(
                "judge items: id {:?} (item {}) is not unique in the batch",
                it.id,
                i + 1
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(id: &str, flipped: bool, preferred: Position) -> Verdict {
        Verdict::from_reply(
            id,
            flipped,
            format!("Comparison: x.\nPreferred: {preferred:?}"),
            Usage {
                prompt_tokens: 100,
                completion_tokens: 10,
            },
        )
    }

    #[test]
    fn score_maps_through_flip() {
        assert_eq!(candidate_score(Position::A, false), 1.0);
        assert_eq!(candidate_score(Position::B, false), 0.0);
        assert_eq!(candidate_score(Position::A, true), 0.0);
        assert_eq!(candidate_score(Position::B, true), 1.0);
    }

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10: the textbook Wilson interval is (0.4902, 0.9433).
        let [lo, hi] = wilson_interval(8.0, 10.0, Z95).unwrap();
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        let [lo, hi] = wilson_interval(0.0, 5.0, Z95).unwrap();
        assert_eq!(lo, 0.0);
        assert!((hi - 0.4345).abs() < 1e-4, "{hi}");
        assert!(wilson_interval(0.0, 0.0, Z95).is_none());
    }

    #[test]
    fn summary_counts_each_verdict_once() {
        let mut tie = decided("t", false, Position::A);
        tie.candidate_score = Some(0.5);
        tie.preferred = None;
        let mut cached = decided("c", true, Position::A); // candidate (B) loses
        cached.cached = true;
        let mut paid = decided("w", false, Position::A); // candidate (A) wins
        paid.requests = 3;
        let vs = vec![
            paid,
            decided("w2", true, Position::B), // wins
            cached,
            tie,
            Verdict::from_reply("u", false, "I cannot decide.".into(), Usage::default()),
            Verdict::failed("f", true, "HTTP 400".into(), Some(400)),
        ];
        let s = JudgeSummary::from_verdicts(
            &vs,
            Prices {
                prompt_per_1k: 0.01,
                completion_per_1k: 0.03,
            },
        );
        assert_eq!(
            (s.n, s.wins, s.losses, s.ties, s.unparseable, s.failed),
            (6, 2, 1, 1, 1, 1)
        );
        assert_eq!(s.decided, 4);
        assert!((s.win_rate.unwrap() - 2.5 / 4.0).abs() < 1e-12);
        let ci = s.win_rate_ci95.unwrap();
        assert!(ci[0] < 0.625 && 0.625 < ci[1]);
        assert_eq!(s.position_bias.shown_a_preferred, 2);
        assert_eq!(s.position_bias.shown_b_preferred, 1);
        assert_eq!(s.position_bias.decided_candidate_a, 2);
        assert_eq!(s.position_bias.decided_candidate_b, 2);
        assert_eq!(s.position_bias.win_rate_candidate_a, Some(0.75));
        assert_eq!(s.position_bias.win_rate_candidate_b, Some(0.5));
        assert_eq!(s.prompt_tokens, 400);
        assert_eq!(s.paid_prompt_tokens, 300);
        assert_eq!(s.cache_hits, 1);
        assert_eq!(s.requests, 3);
        assert!((s.cost - (400.0 * 0.01 + 40.0 * 0.03) / 1000.0).abs() < 1e-12);
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let it = |id: &str| JudgeItem {
            id: id.into(),
            prompt: "p".into(),
            candidate: "c".into(),
            reference: "r".into(),
        };
        assert!(check_unique_ids(&[it("1"), it("2")]).is_ok());
        let e = check_unique_ids(&[it("1"), it("2"), it("1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"1\"") && e.contains("item 3"), "{e}");
    }
}
