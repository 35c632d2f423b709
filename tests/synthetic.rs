//! The teach task through its public API, the way the pipeline uses it: config from TOML,
//! tokenizer on disk, SFT data as text, candidate pairs labeled into preference pairs, records
//! written as JSON lines and read back.

use overopt::data::synthetic::{Perturbation, PrefPair, SftExample, Task, TaskConfig};
use overopt::data::tokenizer::Tok;
use overopt::util::{read_jsonl, to_jsonl, write_atomic};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn teach_task_end_to_end() {
    let cfg = TaskConfig::from_toml("seed = 3\n[labeler]\nlength_bias = 0.2\n", "inline").unwrap();
    let task = Task::new(cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // One tokenization path: the saved tokenizer.json turns the text form into the same ids.
    let tok_path = dir.path().join("tokenizer.json");
    task.save_tokenizer(&tok_path).unwrap();
    let tok = Tok::from_file(&tok_path, None).unwrap();
    let sft = task.sft_examples(64, 100);
    for ex in &sft {
        let (prompt, response) = task.sft_text(ex);
        assert_eq!(
            (tok.encode(&prompt).unwrap(), tok.encode(&response).unwrap()),
            task.sft_ids(ex)
        );
    }

    // Stand-ins for two SFT-model samples per fresh prompt: perturbed references.
    let mut rng = StdRng::seed_from_u64(7);
    let candidates: Vec<_> = task
        .sft_examples(200, 200)
        .into_iter()
        .map(|ex| {
            let r = task.ended(&ex.reference);
            let a = task
                .perturb_any(&ex.post, &r, &Perturbation::ALL, &mut rng)
                .unwrap()
                .1;
            let b = if rng.random_bool(0.5) {
                r
            } else {
                task.ended(&task.perfect_summary(&ex.post))
            };
            (ex.post, a, b)
        })
        .collect();
    let (pairs, stats) = task.preference_pairs(candidates, &mut rng);
    assert_eq!(stats.kept + stats.dropped_identical, 200);
    assert!(stats.chosen_higher_gold > 0.5, "{stats:?}");
    for p in &pairs {
        let (prompt, chosen, rejected) = task.pair_text(p);
        let ids = task.pair_ids(p);
        assert_eq!(tok.encode(&prompt).unwrap(), ids.0);
        assert_eq!(tok.encode(&chosen).unwrap(), ids.1);
        assert_eq!(tok.encode(&rejected).unwrap(), ids.2);
    }

    // Records survive JSON lines.
    let sft_path = dir.path().join("sft.jsonl");
    write_atomic(&sft_path, to_jsonl(&sft).unwrap().as_bytes()).unwrap();
    assert_eq!(read_jsonl::<SftExample>(&sft_path).unwrap(), sft);
    let pairs_path = dir.path().join("pairs.jsonl");
    write_atomic(&pairs_path, to_jsonl(&pairs).unwrap().as_bytes()).unwrap();
    // serde_json parses floats to within an ulp, not always exactly: compare golds loosely.
    let back = read_jsonl::<PrefPair>(&pairs_path).unwrap();
    assert_eq!(back.len(), pairs.len());
    for (x, y) in back.iter().zip(&pairs) {
        assert_eq!(
            (&x.post, &x.chosen, &x.rejected),
            (&y.post, &y.chosen, &y.rejected)
        );
        assert_eq!(
            (x.chosen_ended, x.rejected_ended),
            (y.chosen_ended, y.rejected_ended)
        );
        assert!(
            (x.gold_chosen - y.gold_chosen).abs() < 1e-12
                && (x.gold_rejected - y.gold_rejected).abs() < 1e-12
        );
    }
}
