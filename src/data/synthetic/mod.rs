//! The teach-scale task: a seeded synthetic summarization task with an exact gold judge
//! (SPEC section 4; design in `paper/TEACH-TASK.md`, choices in `docs/teach_task.md`).
//!
//! A post is a shuffled sequence of fact tokens (each with a fixed importance) and filler
//! tokens. A good summary names the post's `top_facts` most important facts, in order of
//! importance, and stops. Reference summaries are noisy on purpose. The gold reward
//! ([`Task::gold`]) scores any response exactly; a simulated labeler ([`Task::judge`]) adds a
//! verbosity bias and noise that the gold reward does not share and draws Bradley-Terry labels.
//!
//! Token sequences come in two forms:
//! - **words**: the summary tokens only, no EOS. References, the text form and preference-pair
//!   responses use it; the model's scoring code appends EOS, as for TL;DR.
//! - **sample**: what the sampler returns: the summary tokens, then EOS if the sample ended.
//!   [`Task::gold`] and the perturbations take this form; [`Task::split_sample`] turns it into
//!   words.
//!
//! Vocabulary (ids): 0 `<|endoftext|>` (EOS, also the BOS that opens every prompt, as in
//! Pythia), 1 `<|padding|>`, 2 `TL;DR:`, then the facts `f0..`, then the fillers `w0..`.

mod config;
mod gold;
mod labeler;
mod perturb;

pub use config::{
    GoldConfig, LabelerConfig, PostConfig, ReferenceConfig, SummaryConfig, TaskConfig, VocabConfig,
};
pub use gold::{GOLD_TIE_TOL, GoldParts};
pub use labeler::{Choice, Judgement, PairStats, PrefPair};
pub use perturb::Perturbation;

use super::tokenizer::Tok;
use anyhow::{Result, anyhow};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// End of sequence; also opens every prompt (BOS).
pub const EOS: u32 = 0;
pub const PAD: u32 = 1;
/// The separator that ends every prompt.
pub const SEP: u32 = 2;
/// Id of the first fact token.
const FIRST_FACT: u32 = 3;

pub const EOS_WORD: &str = "<|endoftext|>";
pub const PAD_WORD: &str = "<|padding|>";
pub const SEP_WORD: &str = "TL;DR:";

/// A post: fact and filler token ids, shuffled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Post {
    pub tokens: Vec<u32>,
}

/// How a reference summary departs from the perfect one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    /// Exactly the top facts, most important first.
    Perfect,
    /// The top facts plus 1..=max_extra other post tokens at random places.
    Extra,
    /// One top fact replaced by a lesser fact of the post.
    Swap,
    /// One top fact left out.
    Drop,
}

/// One SFT example: a post and its (noisy) reference summary in words form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub post: Post,
    pub reference: Vec<u32>,
    pub kind: RefKind,
}

/// The task: config, vocabulary and the importance of every fact token.
#[derive(Debug, Clone)]
pub struct Task {
    cfg: TaskConfig,
    words: Vec<String>,
    /// Importance of fact `i` (id FIRST_FACT + i): a permutation of 1/n, 2/n, ..., 1.
    importance: Vec<f64>,
}

impl Task {
    /// Build the task; fact importances are drawn from `cfg.seed` alone, so the other knobs
    /// (gold weights, labeler, reference noise) never change the world.
    pub fn new(cfg: TaskConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.vocab.n_facts;
        let mut words = vec![
            EOS_WORD.to_string(),
            PAD_WORD.to_string(),
            SEP_WORD.to_string(),
        ];
        words.extend((0..n).map(|i| format!("f{i}")));
        words.extend((0..cfg.vocab.n_fillers).map(|i| format!("w{i}")));
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut ranks: Vec<usize> = (1..=n).collect();
        ranks.shuffle(&mut rng);
        let importance = ranks.iter().map(|&r| r as f64 / n as f64).collect();
        Ok(Self {
            cfg,
            words,
            importance,
        })
    }

    pub fn config(&self) -> &TaskConfig {
        &self.cfg
    }

    /// Word of every id, in id order.
    pub fn vocab(&self) -> &[String] {
        &self.words
    }

    pub fn vocab_size(&self) -> usize {
        self.words.len()
    }

    /// Ids of the fact tokens.
    pub fn fact_ids(&self) -> std::ops::Range<u32> {
        FIRST_FACT..FIRST_FACT + self.cfg.vocab.n_facts as u32
    }

    /// Ids of the filler tokens.
    pub fn filler_ids(&self) -> std::ops::Range<u32> {
        let f = self.fact_ids().end;
        f..f + self.cfg.vocab.n_fillers as u32
    }

    /// Importance of a fact token in (0, 1], all distinct; `None` for other ids.
    pub fn importance(&self, id: u32) -> Option<f64> {
        self.fact_ids()
            .contains(&id)
            .then(|| self.importance[(id - FIRST_FACT) as usize])
    }

    /// The most a response may hold, EOS included.
    pub fn max_response_tokens(&self) -> usize {
        self.cfg.summary.max_tokens
    }

    /// The distinct facts of a post, most important first.
    pub fn facts_by_importance(&self, post: &Post) -> Vec<u32> {
        let mut f: Vec<u32> = Vec::new();
        for &t in &post.tokens {
            if self.importance(t).is_some() && !f.contains(&t) {
                f.push(t);
            }
        }
        f.sort_by(|a, b| {
            self.importance(*b)
                .unwrap()
                .total_cmp(&self.importance(*a).unwrap())
        });
        f
    }

    /// The facts a summary should name: the post's `top_facts` most important, in that order.
    pub fn top_facts(&self, post: &Post) -> Vec<u32> {
        let mut f = self.facts_by_importance(post);
        f.truncate(self.cfg.summary.top_facts);
        f
    }

    /// The post's facts below the top ones.
    pub fn lesser_facts(&self, post: &Post) -> Vec<u32> {
        let mut f = self.facts_by_importance(post);
        f.split_off(self.cfg.summary.top_facts.min(f.len()))
    }

    /// The best summary (words form): the top facts, most important first. Its gold reward is
    /// the maximum, `gold.coverage`.
    pub fn perfect_summary(&self, post: &Post) -> Vec<u32> {
        self.top_facts(post)
    }

    /// Draw one post.
    pub fn sample_post<R: Rng + ?Sized>(&self, rng: &mut R) -> Post {
        let p = &self.cfg.post;
        let len = rng.random_range(p.min_len..=p.max_len);
        let n_facts = rng.random_range(p.min_facts..=p.max_facts);
        let facts = rand::seq::index::sample(rng, self.cfg.vocab.n_facts, n_facts);
        let mut tokens: Vec<u32> = facts.iter().map(|i| FIRST_FACT + i as u32).collect();
        let fillers = self.filler_ids();
        tokens.extend((n_facts..len).map(|_| rng.random_range(fillers.clone())));
        tokens.shuffle(rng);
        Post { tokens }
    }

    /// Draw a noisy reference summary (words form) for a post.
    pub fn sample_reference<R: Rng + ?Sized>(
        &self,
        post: &Post,
        rng: &mut R,
    ) -> (Vec<u32>, RefKind) {
        let r = &self.cfg.reference;
        let mut words = self.top_facts(post);
        let u: f64 = rng.random();
        if u < r.frac_extra {
            let candidates: Vec<u32> = distinct(&post.tokens)
                .into_iter()
                .filter(|t| !words.contains(t))
                .collect();
            let m = rng.random_range(1..=r.max_extra).min(candidates.len());
            for &t in candidates.choose_multiple(rng, m) {
                let at = rng.random_range(0..=words.len());
                words.insert(at, t);
            }
            (words, RefKind::Extra)
        } else if u < r.frac_extra + r.frac_swap {
            let lesser = self.lesser_facts(post);
            let at = rng.random_range(0..words.len());
            words[at] = *lesser
                .choose(rng)
                .expect("validated: every post has a lesser fact");
            (words, RefKind::Swap)
        } else if u < r.frac_extra + r.frac_swap + r.frac_drop {
            let at = rng.random_range(0..words.len());
            words.remove(at);
            (words, RefKind::Drop)
        } else {
            (words, RefKind::Perfect)
        }
    }

    /// `n` posts from `seed` (same seed, same posts).
    pub fn posts(&self, n: usize, seed: u64) -> Vec<Post> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| self.sample_post(&mut rng)).collect()
    }

    /// `n` SFT examples (post, noisy reference) from `seed` (same seed, same data).
    pub fn sft_examples(&self, n: usize, seed: u64) -> Vec<SftExample> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let post = self.sample_post(&mut rng);
                let (reference, kind) = self.sample_reference(&post, &mut rng);
                SftExample {
                    post,
                    reference,
                    kind,
                }
            })
            .collect()
    }

    /// Prompt ids: BOS (= EOS id), the post, the "TL;DR:" separator.
    pub fn prompt_ids(&self, post: &Post) -> Vec<u32> {
        let mut p = Vec::with_capacity(post.tokens.len() + 2);
        p.push(EOS);
        p.extend_from_slice(&post.tokens);
        p.push(SEP);
        p
    }

    /// Text of any ids, words separated by single spaces. Special tokens are written by name
    /// and ids outside the vocabulary as `<|id:N|>`, so nothing is hidden.
    pub fn text(&self, ids: &[u32]) -> String {
        let w: Vec<String> = ids
            .iter()
            .map(|&i| {
                self.words
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("<|id:{i}|>"))
            })
            .collect();
        w.join(" ")
    }

    /// Prompt text; `Tok::encode` of it gives [`Task::prompt_ids`].
    pub fn prompt_text(&self, post: &Post) -> String {
        self.text(&self.prompt_ids(post))
    }

    /// Ids of an SFT example: (prompt, reference words). EOS is left to the scoring code.
    pub fn sft_ids(&self, ex: &SftExample) -> (Vec<u32>, Vec<u32>) {
        (self.prompt_ids(&ex.post), ex.reference.clone())
    }

    /// Text of an SFT example: (prompt, reference). EOS is left to the scoring code.
    pub fn sft_text(&self, ex: &SftExample) -> (String, String) {
        (self.prompt_text(&ex.post), self.text(&ex.reference))
    }

    /// A sample cut into its words (tokens before the first EOS) and whether it ended: EOS
    /// within the first `summary.max_tokens` tokens.
    pub fn split_sample<'a>(&self, sample: &'a [u32]) -> (&'a [u32], bool) {
        match sample.iter().position(|&t| t == EOS) {
            Some(p) => (&sample[..p], p < self.cfg.summary.max_tokens),
            None => (sample, false),
        }
    }

    /// A words-form summary as a sample that ended: words then EOS.
    pub fn ended(&self, words: &[u32]) -> Vec<u32> {
        let mut s = words.to_vec();
        s.push(EOS);
        s
    }

    /// The word-level tokenizer of this vocabulary (WordLevel model, split on whitespace,
    /// `<|endoftext|>` and `<|padding|>` special). Unknown words are an encoding error.
    pub fn tokenizer(&self) -> Result<Tok> {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
        let model = WordLevel::builder()
            .vocab(
                self.words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (w.clone(), i as u32))
                    .collect(),
            )
            .unk_token("<|unk|>".to_string())
            .build()
            .map_err(|e| anyhow!("cannot build the teach vocabulary: {e}"))?;
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(WhitespaceSplit));
        t.add_special_tokens([
            tokenizers::AddedToken::from(EOS_WORD, true),
            tokenizers::AddedToken::from(PAD_WORD, true),
        ])
        .map_err(|e| anyhow!("cannot add the special tokens to the teach vocabulary: {e}"))?;
        let tok = Tok::new(t, Some(EOS), "teach vocabulary")?;
        if tok.pad_id != PAD || tok.vocab_size() != self.vocab_size() {
            anyhow::bail!("teach vocabulary: special tokens were not kept at their ids");
        }
        Ok(tok)
    }

    /// Write the tokenizer as `tokenizer.json` (atomically).
    pub fn save_tokenizer(&self, path: &Path) -> Result<()> {
        self.tokenizer()?.save(path)
    }
}

/// Distinct values in first-seen order.
fn distinct(xs: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for &x in xs {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        Task::new(TaskConfig::default()).unwrap()
    }

    #[test]
    fn vocabulary_layout() {
        let t = task();
        assert_eq!(t.vocab_size(), 53);
        assert_eq!(t.vocab()[EOS as usize], EOS_WORD);
        assert_eq!(t.vocab()[PAD as usize], PAD_WORD);
        assert_eq!(t.vocab()[SEP as usize], SEP_WORD);
        assert_eq!(t.fact_ids(), 3..43);
        assert_eq!(t.filler_ids(), 43..53);
        let mut imp: Vec<f64> = t.fact_ids().map(|i| t.importance(i).unwrap()).collect();
        imp.sort_by(f64::total_cmp);
        imp.dedup();
        assert_eq!(imp.len(), 40, "importances must be distinct");
        assert!(t.importance(SEP).is_none() && t.importance(43).is_none());
    }

    #[test]
    fn posts_have_the_configured_shape() {
        let t = task();
        for post in t.posts(500, 1) {
            let n = post.tokens.len();
            assert!((10..=20).contains(&n), "length {n}");
            let facts = t.facts_by_importance(&post);
            let n_fact_tokens = post
                .tokens
                .iter()
                .filter(|&&x| t.importance(x).is_some())
                .count();
            assert_eq!(
                facts.len(),
                n_fact_tokens,
                "facts must be distinct in a post"
            );
            assert!((4..=8).contains(&facts.len()));
            assert!(
                post.tokens
                    .iter()
                    .all(|x| t.fact_ids().contains(x) || t.filler_ids().contains(x))
            );
            let top = t.top_facts(&post);
            assert_eq!(top.len(), 3);
            let worst_top = t.importance(top[2]).unwrap();
            assert!(
                t.lesser_facts(&post)
                    .iter()
                    .all(|&l| t.importance(l).unwrap() < worst_top)
            );
        }
    }

    #[test]
    fn references_follow_the_noise_mix() {
        let t = task();
        let data = t.sft_examples(4000, 2);
        let mut counts = std::collections::HashMap::new();
        for ex in &data {
            *counts.entry(ex.kind).or_insert(0usize) += 1;
            let top = t.top_facts(&ex.post);
            let r = &ex.reference;
            assert!(!r.is_empty() && r.len() < t.max_response_tokens());
            assert_eq!(
                distinct(r).len(),
                r.len(),
                "references never repeat a token"
            );
            assert!(
                r.iter().all(|x| ex.post.tokens.contains(x)),
                "references only use post tokens"
            );
            match ex.kind {
                RefKind::Perfect => assert_eq!(r, &top),
                RefKind::Extra => {
                    assert!((4..=5).contains(&r.len()));
                    let kept: Vec<u32> = r.iter().copied().filter(|x| top.contains(x)).collect();
                    assert_eq!(kept, top, "extras keep the top facts in order");
                }
                RefKind::Swap => {
                    assert_eq!(r.len(), 3);
                    assert_eq!(r.iter().filter(|x| top.contains(x)).count(), 2);
                }
                RefKind::Drop => {
                    assert_eq!(r.len(), 2);
                    assert!(r.iter().all(|x| top.contains(x)));
                }
            }
        }
        // Expected fractions 0.6 / 0.2 / 0.1 / 0.1; allow 4 binomial standard deviations.
        for (kind, p) in [
            (RefKind::Perfect, 0.6),
            (RefKind::Extra, 0.2),
            (RefKind::Swap, 0.1),
            (RefKind::Drop, 0.1),
        ] {
            let got = *counts.get(&kind).unwrap_or(&0) as f64 / data.len() as f64;
            let sd = (p * (1.0 - p) / data.len() as f64).sqrt();
            assert!((got - p).abs() < 4.0 * sd, "{kind:?}: {got} vs {p}");
        }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let t = task();
        assert_eq!(t.sft_examples(50, 9), t.sft_examples(50, 9));
        assert_ne!(t.sft_examples(50, 9), t.sft_examples(50, 10));
        assert_eq!(t.posts(50, 9), task().posts(50, 9));
        // The world depends on `seed` only; other knobs leave it and the data alone.
        let mut cfg = TaskConfig::default();
        cfg.labeler.length_bias = 0.0;
        cfg.gold.hallucination = 2.0;
        let t2 = Task::new(cfg.clone()).unwrap();
        assert_eq!(t.sft_examples(50, 9), t2.sft_examples(50, 9));
        assert!(t.fact_ids().all(|i| t.importance(i) == t2.importance(i)));
        cfg.seed = 1;
        let t3 = Task::new(cfg).unwrap();
        assert!(t.fact_ids().any(|i| t.importance(i) != t3.importance(i)));
        assert_ne!(
            t.sft_examples(50, 9),
            t3.sft_examples(50, 9),
            "top facts differ across worlds"
        );
    }

    #[test]
    fn tokenizer_round_trips_the_generator_ids() {
        let t = task();
        let tok = t.tokenizer().unwrap();
        assert_eq!(
            (tok.eos_id, tok.pad_id, tok.vocab_size()),
            (EOS, PAD, t.vocab_size())
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save_tokenizer(&path).unwrap();
        let loaded = Tok::from_file(&path, None).unwrap();
        assert_eq!((loaded.eos_id, loaded.pad_id), (EOS, PAD));
        for ex in t.sft_examples(200, 3) {
            let (p_ids, r_ids) = t.sft_ids(&ex);
            let (p_text, r_text) = t.sft_text(&ex);
            for tk in [&tok, &loaded] {
                assert_eq!(tk.encode(&p_text).unwrap(), p_ids, "{p_text}");
                assert_eq!(tk.encode(&r_text).unwrap(), r_ids, "{r_text}");
                assert_eq!(tk.decode(&r_ids).unwrap(), r_text);
                // decode drops the special BOS; the rest of the prompt comes back as text.
                assert_eq!(tk.decode(&p_ids).unwrap(), t.text(&p_ids[1..]));
            }
        }
        let all: Vec<u32> = (0..t.vocab_size() as u32).collect();
        assert_eq!(tok.encode(&t.text(&all)).unwrap(), all);
        assert!(
            tok.encode("f1 nonsense").is_err(),
            "unknown words must not pass silently"
        );
        assert_eq!(t.text(&[3, 999]), "f0 <|id:999|>");
    }
}
