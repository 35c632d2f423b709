//! Checks of training examples in token ids, run over a whole data set before any training,
//! so that a bad example stops a run at once, named, instead of in the micro-batch that
//! happens to draw it. The messages say what is wrong; callers say where (file and line, or
//! the example's number).

use super::{PrefExample, SftExample};
use anyhow::{Context, Result, bail};

/// What a model accepts: token ids below `vocab`, sequences of at most `max_positions`
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vocab: usize,
    pub max_positions: usize,
}

impl Limits {
    /// The tighter of two models' limits (a policy and its reference).
    pub fn min(self, other: Limits) -> Limits {
        Limits {
            vocab: self.vocab.min(other.vocab),
            max_positions: self.max_positions.min(other.max_positions),
        }
    }

    /// The EOS appended to every response and the padding id must be tokens of the model.
    pub fn check_special(&self, eos: u32, pad: u32) -> Result<()> {
        for (name, id) in [("EOS", eos), ("PAD", pad)] {
            if id as usize >= self.vocab {
                bail!(
                    "{name} id {id} is beyond the model's vocabulary of {}",
                    self.vocab
                );
            }
        }
        Ok(())
    }

    fn check_ids(&self, what: &str, ids: &[u32]) -> Result<()> {
        if let Some((j, t)) = ids
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.vocab)
        {
            bail!(
                "`{what}`: token {t} at position {j} is beyond the model's vocabulary of {}",
                self.vocab
            );
        }
        Ok(())
    }

    /// prompt ++ response ++ EOS must fit the model's positions.
    fn check_length(&self, what: &str, prompt: usize, response: usize) -> Result<()> {
        let n = prompt + response + 1;
        if n > self.max_positions {
            bail!(
                "`prompt` + `{what}` + EOS is {n} tokens ({prompt} + {response} + 1), beyond the model's max_position_embeddings of {}",
                self.max_positions
            );
        }
        Ok(())
    }
}

/// An empty prompt cannot be scored: the first response token is predicted from the
/// prompt's last token.
fn check_prompt(prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        bail!(
            "empty `prompt` (at least one token, e.g. BOS, is needed to score the first response token)"
        );
    }
    Ok(())
}

/// An SFT example as training scores it: prompt ++ response ++ EOS. An empty response is
/// allowed here (the model learns to end at once); text data rejects it when read.
pub fn check_sft(ex: &SftExample, lim: &Limits) -> Result<()> {
    check_prompt(&ex.prompt)?;
    lim.check_ids("prompt", &ex.prompt)?;
    lim.check_ids("response", &ex.response)?;
    lim.check_length("response", ex.prompt.len(), ex.response.len())
}

/// A preference pair as training scores it: prompt ++ chosen ++ EOS and prompt ++ rejected
/// ++ EOS. Empty responses are allowed here, as in [`check_sft`].
pub fn check_pref(ex: &PrefExample, lim: &Limits) -> Result<()> {
    check_prompt(&ex.prompt)?;
    lim.check_ids("prompt", &ex.prompt)?;
    lim.check_ids("chosen", &ex.chosen)?;
    lim.check_ids("rejected", &ex.rejected)?;
    lim.check_length("chosen", ex.prompt.len(), ex.chosen.len())?;
    lim.check_length("rejected", ex.prompt.len(), ex.rejected.len())
}

/// Check every example of a data set built in memory, naming the first bad one by its
/// number (1-based): "`label`: training example N of M: ...".
pub fn check_all<T>(label: &str, data: &[T], check: impl Fn(&T) -> Result<()>) -> Result<()> {
    for (i, ex) in data.iter().enumerate() {
        check(ex)
            .with_context(|| format!("{label}: training example {} of {}", i + 1, data.len()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        vocab: 10,
        max_positions: 8,
    };

    fn sft(p: &[u32], r: &[u32]) -> SftExample {
        SftExample {
            prompt: p.to_vec(),
            response: r.to_vec(),
        }
    }

    fn pref(p: &[u32], c: &[u32], r: &[u32]) -> PrefExample {
        PrefExample {
            prompt: p.to_vec(),
            chosen: c.to_vec(),
            rejected: r.to_vec(),
        }
    }

    fn err(r: Result<()>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn examples_are_checked_for_empty_prompts_vocabulary_and_length() {
        check_sft(&sft(&[1, 2], &[3]), &LIM).unwrap();
        // An empty response scores EOS alone.
        check_sft(&sft(&[1], &[]), &LIM).unwrap();
        assert!(err(check_sft(&sft(&[], &[3]), &LIM)).contains("empty `prompt`"));
        let e = err(check_sft(&sft(&[1, 2], &[3, 12]), &LIM));
        assert!(
            e.contains("`response`: token 12 at position 1") && e.contains("vocabulary of 10"),
            "{e}"
        );
        // 3 + 4 + EOS fits 8 positions; 3 + 5 + EOS does not.
        check_sft(&sft(&[1; 3], &[2; 4]), &LIM).unwrap();
        let e = err(check_sft(&sft(&[1; 3], &[2; 5]), &LIM));
        assert!(
            e.contains("9 tokens") && e.contains("max_position_embeddings of 8"),
            "{e}"
        );

        check_pref(&pref(&[1], &[2], &[]), &LIM).unwrap();
        assert!(err(check_pref(&pref(&[], &[2], &[3]), &LIM)).contains("empty `prompt`"));
        let e = err(check_pref(&pref(&[1], &[2], &[3, 4, 10]), &LIM));
        assert!(e.contains("`rejected`: token 10 at position 2"), "{e}");
        let e = err(check_pref(&pref(&[11], &[2], &[3]), &LIM));
        assert!(e.contains("`prompt`: token 11 at position 0"), "{e}");
        let e = err(check_pref(&pref(&[1; 4], &[2; 4], &[3]), &LIM));
        assert!(e.contains("`chosen` + EOS is 9 tokens"), "{e}");
    }

    #[test]
    fn special_ids_and_the_first_bad_example_are_named() {
        LIM.check_special(0, 9).unwrap();
        let e = err(LIM.check_special(0, 10));
        assert!(e.contains("PAD id 10"), "{e}");
        let e = err(LIM.check_special(10, 1));
        assert!(e.contains("EOS id 10"), "{e}");
        let data = [
            sft(&[1], &[2]),
            sft(&[1], &[2]),
            sft(&[], &[2]),
            sft(&[], &[2]),
        ];
        let e = err(check_all("sft", &data, |x| check_sft(x, &LIM)));
        assert!(
            e.starts_with("sft: training example 3 of 4: empty `prompt`"),
            "{e}"
        );
        let m = Limits {
            vocab: 20,
            max_positions: 4,
        };
        assert_eq!(
            LIM.min(m),
            Limits {
                vocab: 10,
                max_positions: 4
            }
        );
    }
}
