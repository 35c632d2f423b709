//! The paper-scale configs in artifact/configs/paper parse with the crate's schemas, carry the
//! settings of SPEC section 1 and the single-GPU settings their README documents, and the grid
//! file (its schema is documented in the folder's README.md) expands to the 63 DAA runs, by
//! hand here and through the sweep (`overopt::sweep::paper`).

use overopt::data::tldr::TldrConfig;
use overopt::sweep::paper::{Paper, PaperGrid};
use overopt::train::config::RunConfig;
use overopt::train::loss::Objective;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("artifact/configs/paper")
}

/// GPT-NeoX parameter count: per layer 12 h^2 + 13 h (qkv, dense, 4h MLP, biases, two layer
/// norms), a final layer norm, untied input and output embeddings.
fn neox_params(layers: u64, hidden: u64, vocab: u64) -> u64 {
    layers * (12 * hidden * hidden + 13 * hidden) + 2 * hidden + 2 * vocab * hidden
}

/// The run settings SPEC section 1 fixes for every SFT and DAA run.
fn check_common(c: &RunConfig, file: &str) {
    // 128 examples per optimizer step, however they are split into micro-batches.
    assert_eq!(c.train.batch_size, 128, "{file}");
    assert_eq!(
        c.train.micro_batch_size * c.train.accumulation_steps(),
        128,
        "{file}: micro-batch x accumulation steps"
    );
    assert_eq!(c.optim.lr, 5e-7, "{file}");
    assert_eq!(c.optim.warmup_steps, 150, "{file}");
    assert_eq!(c.optim.alpha, 0.99, "{file}");
    assert_eq!(c.optim.eps, 1e-8, "{file}");
    assert_eq!(c.optim.max_grad_norm, Some(10.0), "{file}");
    assert_eq!(
        (c.data.max_length, c.data.max_prompt_length),
        (512, 256),
        "{file}"
    );
    assert_eq!(c.model.dtype, "f32", "{file}: f32 master weights");
}

/// The settings that fit one H200 (README.md, "Single-GPU settings"): file, micro-batch,
/// bf16 autocast, activation checkpointing.
const SINGLE_GPU: [(&str, usize, bool, bool); 6] = [
    ("sft-pythia-1b.toml", 16, false, false),
    ("daa-pythia-1b.toml", 16, false, false),
    ("sft-pythia-2.8b.toml", 8, false, false),
    ("daa-pythia-2.8b.toml", 4, false, false),
    ("sft-pythia-6.9b.toml", 4, true, true),
    ("daa-pythia-6.9b.toml", 2, true, true),
];

/// `file` has the single-GPU settings of [`SINGLE_GPU`], its comment on `micro_batch_size`
/// names the accumulation steps that follow from it, and the README's table row for the file
/// says the same.
fn check_single_gpu(c: &RunConfig, file: &str, readme: &str) {
    let &(_, micro, autocast, ckpt) = SINGLE_GPU
        .iter()
        .find(|s| s.0 == file)
        .unwrap_or_else(|| panic!("{file}: not in SINGLE_GPU"));
    let accum = 128 / micro;
    assert_eq!(c.train.micro_batch_size, micro, "{file}");
    assert_eq!(c.train.accumulation_steps(), accum, "{file}");
    let want = if autocast {
        overopt::train::config::Autocast::Bf16
    } else {
        overopt::train::config::Autocast::Off
    };
    assert_eq!(c.model.autocast, want, "{file}: autocast");
    assert_eq!(c.model.checkpoint_layers, ckpt, "{file}: checkpoint_layers");

    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("micro_batch_size"))
        .unwrap_or_else(|| panic!("{file}: no micro_batch_size line"));
    assert!(
        line.contains(&format!("# x {accum} gradient-accumulation steps")),
        "{file}: the comment of `{line}` does not say {accum} accumulation steps"
    );

    let row = readme
        .lines()
        .find(|l| l.starts_with(&format!("| `{file}` |")))
        .unwrap_or_else(|| panic!("README.md: no row for {file} in the single-GPU table"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // | file | micro-batch x accumulation | autocast | checkpoint_layers | ...
    assert_eq!(cells[2], format!("{micro} x {accum}"), "README.md: {row}");
    assert_eq!(
        cells[3],
        if autocast { "`bf16`" } else { "off" },
        "README.md: {row}"
    );
    assert_eq!(
        cells[4],
        if ckpt { "on" } else { "off" },
        "README.md: {row}"
    );
}

#[test]
fn paper_grid_and_run_configs_match_the_spec() {
    let d = dir();
    let readme = std::fs::read_to_string(d.join("README.md")).unwrap();
    let grid = PaperGrid::from_file(&d.join("grid.toml")).unwrap();
    assert_eq!(grid.schema, "overopt-paper-grid/1");
    let data = TldrConfig::from_file(&d.join(&grid.data)).unwrap();
    assert_eq!(data.prefs.repo, "openai/summarize_from_feedback");
    assert_eq!(data.prefs.config, "comparisons");
    assert_eq!(data.prefs.eval_split, "validation");
    assert_eq!((data.max_length, data.max_prompt_length), (512, 256));

    // Objectives and betas: 3 x 7, log-spaced, two decades.
    assert_eq!(grid.objectives, ["dpo", "ipo", "slic"]);
    assert_eq!(
        grid.betas.keys().collect::<Vec<_>>(),
        ["dpo", "ipo", "slic"].iter().collect::<Vec<_>>()
    );
    for (obj, betas) in &grid.betas {
        assert_eq!(betas.len(), 7, "{obj}");
        assert!(
            betas[6] / betas[0] >= 99.0,
            "{obj}: {betas:?} spans < 2 decades"
        );
        for w in betas.windows(2) {
            let r = w[1] / w[0];
            assert!((1.9..=2.6).contains(&r), "{obj}: {betas:?} not log-spaced");
        }
    }

    // Models: the three sizes, with parameter counts that follow from their architecture.
    let arch = [
        ("EleutherAI/pythia-1b", 16, 2048, 50304),
        ("EleutherAI/pythia-2.8b", 32, 2560, 50304),
        ("EleutherAI/pythia-6.9b", 32, 4096, 50432),
    ];
    assert_eq!(grid.models.len(), 3);
    let mut runs = Vec::new();
    for (m, (source, layers, hidden, vocab)) in grid.models.iter().zip(arch) {
        assert_eq!(m.source, source);
        assert_eq!(m.params, neox_params(layers, hidden, vocab), "{}", m.name);
        let commit = m.commit_prefix.as_deref().unwrap();
        assert_eq!(commit.len(), 7);
        assert!(commit.bytes().all(|b| b.is_ascii_hexdigit()));
        let sft_file = d.join(&m.sft);
        let sft = RunConfig::from_file(&sft_file).unwrap();
        check_common(&sft, &m.sft.display().to_string());
        check_single_gpu(&sft, &m.sft.display().to_string(), &readme);
        assert_eq!(sft.model.source, m.source);
        assert_eq!(sft.model.revision, m.revision);
        assert!(sft.daa.is_none());
        assert_eq!(
            sft.out_dir,
            Path::new(&grid.out_root).join(&m.name).join("sft")
        );
        // The DAA template starts from the SFT's last checkpoint: 116,722 / 128 = 911 steps.
        let tmpl = RunConfig::from_file(&d.join(&m.daa)).unwrap();
        check_common(&tmpl, &m.daa.display().to_string());
        check_single_gpu(&tmpl, &m.daa.display().to_string(), &readme);
        assert_eq!(tmpl.train.checkpoints, [0.25, 0.5, 0.75, 1.0]);
        let last_sft = sft.out_dir.join(format!("step-{:06}", 116_722 / 128));
        assert_eq!(Path::new(&tmpl.model.source), last_sft);
        let reference = tmpl.reference.clone().unwrap();
        assert_eq!(Path::new(&reference.source), last_sft);
        assert!(tmpl.daa.is_some());
        for obj in &grid.objectives {
            let objective: Objective = toml::from_str(&format!("name = \"{obj}\"")).unwrap();
            for &beta in &grid.betas[obj] {
                let mut run = tmpl.clone();
                let daa = run.daa.as_mut().unwrap();
                daa.objective = objective;
                daa.beta = beta;
                run.out_dir = Path::new(&grid.out_root)
                    .join(&m.name)
                    .join(obj)
                    .join(format!("beta-{beta}"));
                // Each expanded run is a valid single-run config.
                let text = toml::to_string(&run).unwrap();
                runs.push(RunConfig::from_toml(&text, "expanded run").unwrap());
            }
        }
        // The template's own values are the grid's first point.
        assert_eq!(runs[runs.len() - 21].out_dir, tmpl.out_dir);
    }
    assert_eq!(runs.len(), 63);
    let dirs: BTreeSet<_> = runs.iter().map(|r| r.out_dir.clone()).collect();
    assert_eq!(dirs.len(), 63);
    // The sweep expands the grid the same way (into its own out_root, so paths stay as written),
    // starting each run from the SFT run's final checkpoint.
    let paper = Paper::new(&d.join("grid.toml"), &grid.out_root).unwrap();
    let specs = paper.runs().unwrap();
    assert_eq!(specs.len(), runs.len());
    for (spec, hand) in specs.iter().zip(&runs) {
        let c = paper.daa_config(spec).unwrap();
        assert_eq!(
            (&c.out_dir, &c.daa, &c.train, &c.optim, &c.data),
            (
                &hand.out_dir,
                &hand.daa,
                &hand.train,
                &hand.optim,
                &hand.data
            ),
            "{}",
            spec.id()
        );
        let fin = grid.out_root.join(&spec.size).join("sft").join("final");
        assert_eq!(Path::new(&c.model.source), fin);
        assert_eq!(Path::new(&c.reference.as_ref().unwrap().source), fin);
        assert_eq!(c.reference.as_ref().unwrap().dtype, "bf16");
    }

    // Evaluation prompts and their reference summaries come from the SFT set's held-out split
    // (`prompt`, and `response` = the human summary) in the folder `overopt export-tldr` writes
    // and the run configs read; not from the preference pairs, which have no reference summary.
    let e = &grid.eval;
    assert_eq!(
        e.prompt_file.file_name().unwrap(),
        "sft-eval.jsonl",
        "grid.toml: [eval] prompt_file"
    );
    assert_ne!(data.sft.eval_split, data.sft.train_split);
    assert!(data.sft.max_eval.is_none_or(|n| n >= e.prompts));
    for r in &runs {
        assert_eq!(
            e.prompt_file.parent(),
            r.data.train.parent(),
            "the eval prompts are not in the folder of {}",
            r.data.train.display()
        );
    }
    assert_eq!((e.prompts, e.top_k, e.max_length), (256, 50, 512));
    assert_eq!(e.temperature, 1.0);
    assert_eq!(e.samples_per_prompt, 1);
    assert_eq!(e.seed, 0);
    assert!(e.judge.starts_with("gpt-4-turbo"));
}
