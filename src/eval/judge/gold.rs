//! The teach scale's exact gold judge behind the same [`Judge`] trait as the API judge: the
//! items' texts are read back into the synthetic task's tokens and compared by the gold
//! reward (ties 0.5). Unreadable texts become failed verdicts naming the problem.

use super::{
    Judge, JudgeItem, JudgeReport, JudgeSummary, Prices, Usage, Verdict, VerdictStatus,
    check_unique_ids,
};
use crate::data::synthetic::{Post, SEP, Task};
use crate::data::tokenizer::Tok;
use anyhow::{Result, anyhow};

/// Gold judge of the synthetic task.
pub struct GoldJudge {
    task: Task,
    tok: Tok,
}

impl GoldJudge {
    pub fn new(task: Task) -> Result<Self> {
        let tok = task.tokenizer()?;
        Ok(Self { task, tok })
    }

    /// Score one item: the prompt's post, the candidate as a sample (EOS appended: a judged
    /// text is a finished summary) and the reference words.
    pub fn score(&self, item: &JudgeItem) -> Result<f64> {
        let prompt = self
            .tok
            .encode(&item.prompt)
            .map_err(|e| anyhow!("prompt: {e}"))?;
        let body: Vec<u32> = prompt
            .iter()
            .copied()
            .skip_while(|&t| t == crate::data::synthetic::EOS)
            .take_while(|&t| t != SEP)
            .collect();
        if body.is_empty() {
            return Err(anyhow!("prompt holds no post tokens"));
        }
        let post = Post { tokens: body };
        let cand = self
            .tok
            .encode(&item.candidate)
            .map_err(|e| anyhow!("candidate: {e}"))?;
        let reference = self
            .tok
            .encode(&item.reference)
            .map_err(|e| anyhow!("reference: {e}"))?;
        Ok(self
            .task
            .gold_win(&post, &self.task.ended(&cand), &reference))
    }
}

impl Judge for GoldJudge {
    fn judge(&self, items: &[JudgeItem]) -> Result<JudgeReport> {
        check_unique_ids(items)?;
        let verdicts: Vec<Verdict> = items
            .iter()
            .map(|it| match self.score(it) {
                Ok(s) => Verdict {
                    id: it.id.clone(),
                    status: VerdictStatus::Decided,
                    candidate_score: Some(s),
                    flipped: false,
                    preferred: None,
                    reply: None,
                    error: None,
                    http_status: None,
                    usage: Usage::default(),
                    cached: false,
                    requests: 0,
                    response_model: None,
                },
                Err(e) => Verdict::failed(&it.id, false, format!("item {}: {e}", it.id), None),
            })
            .collect();
        let summary = JudgeSummary::from_verdicts(&verdicts, Prices::default());
        Ok(JudgeReport { verdicts, summary })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::TaskConfig;

    #[test]
    fn gold_judge_scores_texts_like_the_gold_reward() {
        let task = Task::new(TaskConfig::default()).unwrap();
        let ex = task.sft_examples(20, 9);
        let judge = GoldJudge::new(task.clone()).unwrap();
        let mut items = vec![];
        for (i, e) in ex.iter().enumerate() {
            let perfect = task.perfect_summary(&e.post);
            items.push(JudgeItem {
                id: format!("p{i}"),
                prompt: task.prompt_text(&e.post),
                candidate: task.text(&perfect),
                reference: task.text(&e.reference),
            });
        }
        items.push(JudgeItem {
            id: "bad".into(),
            prompt: "nonsense words".into(),
            candidate: "f1".into(),
            reference: "f2".into(),
        });
        let r = judge.judge(&items).unwrap();
        for (i, e) in ex.iter().enumerate() {
            let want = task.gold_win(
                &e.post,
                &task.ended(&task.perfect_summary(&e.post)),
                &e.reference,
            );
            assert_eq!(r.verdicts[i].candidate_score, Some(want));
            // A perfect summary never loses to the reference.
            assert!(want >= 0.5);
        }
        assert_eq!(r.verdicts[20].status, VerdictStatus::Failed);
        assert!(r.verdicts[20].error.as_ref().unwrap().contains("bad"));
        assert_eq!(r.summary.failed, 1);
    }
}
