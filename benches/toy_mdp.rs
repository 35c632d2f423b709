//! Wall time of the toy-MDP section with the default config (not a timed test: it only prints).
//!
//! `cargo bench --bench toy_mdp` (release profile), or `cargo bench --profile dev --bench
//! toy_mdp` to reuse the debug build. An optional argument is a TOML config file;
//! `--out DIR` keeps the section's tables there (default: a temporary directory).

use overopt::toy_mdp::{ToyMdpConfig, run_section};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a TOML path is the first argument not starting with '-'
    // (other than the value of `--out`)
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_arg = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned());
    let cfg = match args
        .iter()
        .find(|a| !a.starts_with('-') && Some(*a) != out_arg.as_ref())
    {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            toml::from_str::<ToyMdpConfig>(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?
        }
        None => ToyMdpConfig::default(),
    };
    let tmp = tempfile::tempdir()?;
    let out = match &out_arg {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().to_path_buf(),
    };
    let t0 = Instant::now();
    let rep = run_section(&cfg, &out)?;
    let wall = t0.elapsed().as_secs_f64();
    let runs = rep.runs.len();
    let steps = cfg.seeds.len() * cfg.sft.steps + runs * cfg.daa.steps;
    println!(
        "toy_mdp run_section: {wall:.2} s wall for {} seeds, {runs} DAA runs, {steps} optimizer steps \
         ({:.0} us/step), policy of {} parameters",
        cfg.seeds.len(),
        1e6 * wall / steps.max(1) as f64,
        rep.num_params
    );
    println!(
        "SFT mass on the demonstrations: median {:.4} (min {:.4}, max {:.4})",
        rep.sft_in_distribution.median, rep.sft_in_distribution.min, rep.sft_in_distribution.max
    );
    println!("{}", rep.c9.verdict);
    Ok(())
}
