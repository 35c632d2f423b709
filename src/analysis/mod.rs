//! Analysis of the sweep's results: the pure, plot-free part of the paper's sections 3.1-3.5
//! and 4.
//!
//! - [`table`]: the row types the sweep writes and the analysis reads (`ResultRow`,
//!   `SampleRow`, `ToyMdpSummary`).
//! - [`fits`]: section 3.2, d(alpha - b ln d) against quadratics, fitted to the win-rate gain
//!   over the SFT policy.
//! - [`length`]: section 3.3, the regression of the implicit log-ratio on length, and a
//!   length-controlled win rate.
//! - [`metrics`]: sections 3.4-3.5, correlations of training-side metrics with win rate.
//! - [`claims`]: a verdict for each claim C1-C9 (rules in docs/claims.md), and claims.json.
//!
//! Every function here is deterministic: bootstraps take an explicit seed.

pub mod claims;
pub mod fits;
pub mod length;
pub mod metrics;
pub mod stats;
pub mod table;

pub use claims::{Thresholds, Verdict, VerdictKind, evaluate_all, write_claims_json};
pub use table::{ResultRow, SampleRow, ToyMdpSummary};

/// A CSV field for a string: quoted when it holds a comma, quote or line break.
pub(crate) fn csv_str(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A CSV field for a number: empty when not finite.
pub(crate) fn csv_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_escape() {
        assert_eq!(csv_str("a,b"), "\"a,b\"");
        assert_eq!(csv_str("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_str("plain"), "plain");
        assert_eq!(csv_num(f64::NAN), "");
        assert_eq!(csv_num(0.25), "0.25");
    }

    #[test]
    fn csv_writers_write_headers_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<SampleRow> = (1..=5)
            .map(|l| SampleRow {
                objective: "dpo".into(),
                beta: 0.1,
                size: "s".into(),
                checkpoint: 1.0,
                seed: 0,
                log_ratio: l as f64,
                length: l,
            })
            .collect();
        let p = dir.path().join("length.csv");
        length::write_length_csv(&p, &length::length_fits(&samples)).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("objective,size,beta,checkpoint,seed,n,gamma"));
        assert!(lines[1].starts_with("dpo,s,0.1,1,0,5,1,"), "{}", lines[1]);

        let d: Vec<f64> = (1..=8).map(|i| 0.3 * i as f64).collect();
        let pts: Vec<fits::GainPoint> = d
            .iter()
            .map(|&d| fits::GainPoint {
                objective: "dpo".into(),
                size: "s".into(),
                beta: 0.1,
                checkpoint: 1.0,
                seed: 0,
                d,
                gain: d * (0.2 - 0.1 * d.ln()),
            })
            .collect();
        let refs: Vec<&fits::GainPoint> = pts.iter().collect();
        let opts = fits::FitOptions {
            n_boot: 20,
            ..Default::default()
        };
        let g = fits::fit_points("dpo", "s", &refs, &opts);
        let p = dir.path().join("fits.csv");
        fits::write_fit_csv(&p, &[g]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 1 + fits::Form::ALL.len());
        assert!(text.contains("dpo,s,log_d,alpha;b,8,"), "{text}");
    }
}
