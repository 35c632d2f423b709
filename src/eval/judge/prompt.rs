//! The judging prompt for TL;DR summaries, the per-comparison random order, and the parser of
//! the judge's `Preferred:` line.
//!
//! The prompt follows the protocol of the DPO paper's summarization evaluation (the judge is
//! asked which summary better covers the post's most important points without unimportant or
//! irrelevant details, gives a one-sentence comparison, then names "A" or "B"); the wording here
//! is this crate's own.

use super::Position;
use sha2::{Digest, Sha256};

/// The post to show the judge for a policy prompt: the TL;DR prompt format ends with `TL;DR:`
/// (see SPEC: "SUBREDDIT: ...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:"), which is a cue for the
/// policy, not part of the post; it is removed, with surrounding whitespace.
pub fn post_text(prompt: &str) -> &str {
    let t = prompt.trim_end();
    t.strip_suffix("TL;DR:").unwrap_or(t).trim()
}

/// The full judging prompt (a single user message) for a post and the summaries shown as A and B.
pub fn render(post: &str, summary_a: &str, summary_b: &str) -> String {
    let mut s = String::with_capacity(post.len() + summary_a.len() + summary_b.len() + 700);
    s.push_str(
        "Which of the following summaries does a better job of summarizing the most important \
         points in the given forum post, without including unimportant or irrelevant details? \
         Favour a summary that is accurate and to the point.\n\n",
    );
    s.push_str("Post:\n");
    s.push_str(post.trim());
    s.push_str("\n\nSummary A:\n");
    s.push_str(summary_a.trim());
    s.push_str("\n\nSummary B:\n");
    s.push_str(summary_b.trim());
    s.push_str(
        "\n\nFIRST provide a one-sentence comparison of the two summaries, saying which one you \
         prefer and why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your \
         choice. Answer in exactly this format:\n\
         Comparison: <one-sentence comparison and explanation>\n\
         Preferred: <\"A\" or \"B\">",
    );
    s
}

/// Whether the candidate is shown as summary B for this comparison: a fair coin drawn from
/// SHA-256 of the seed and the item id, so the order does not depend on batch order,
/// concurrency or re-runs.
pub fn flip_for(seed: u64, id: &str) -> bool {
    let mut h = Sha256::new();
    h.update(b"overopt/judge/order/v1\0");
    h.update(seed.to_le_bytes());
    h.update(id.as_bytes());
    h.finalize()[0] & 1 == 1
}

/// Characters stripped around a `Preferred:` value and the line's label: whitespace, quotes,
/// markdown emphasis and trailing punctuation.
fn is_decoration(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\''
                | '`'
                | '*'
                | '_'
                | '#'
                | '\u{201c}'
                | '\u{201d}'
                | '\u{2018}'
                | '\u{2019}'
                | '.'
                | '!'
                | ','
                | ';'
                | ':'
        )
}

fn parse_value(v: &str) -> Option<Position> {
    match v.trim_matches(is_decoration) {
        "A" | "a" => Some(Position::A),
        "B" | "b" => Some(Position::B),
        _ => None,
    }
}

/// Read the preference from a judge's reply: the value of its `Preferred:` line(s).
///
/// Lenient about case (`preferred: b`), whitespace, quotes (`"A"`, `'B'`, curly quotes),
/// markdown emphasis (`**Preferred:** A`) and trailing punctuation (`A.`); a label with an
/// empty value takes the next non-empty line. Anything else is unparseable (`None`): no such
/// line, a value other than A or B (e.g. `Summary A`, `Both`), or several lines that disagree.
pub fn parse_preferred(reply: &str) -> Option<Position> {
    let lines: Vec<&str> = reply.lines().collect();
    let mut found: Option<Position> = None;
    for (i, line) in lines.iter().enumerate() {
        let label = line
            .trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '#' | '>'));
        let Some(head) = label.get(..9) else { continue };
        if !head.eq_ignore_ascii_case("preferred") {
            continue;
        }
        let rest =
            label[9..].trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_'));
        let Some(value) = rest.strip_prefix(':') else {
            continue;
        };
        let value = if value.trim_matches(is_decoration).is_empty() {
            lines[i + 1..]
                .iter()
                .copied()
                .find(|l| !l.trim_matches(is_decoration).is_empty())
                .unwrap_or("")
        } else {
            value
        };
        let p = parse_value(value)?;
        if found.is_some_and(|q| q != p) {
            return None;
        }
        found = Some(p);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_has_both_summaries_in_order() {
        let p = render("The post.", " first ", "second");
        let a = p.find("Summary A:\nfirst\n").unwrap();
        let b = p.find("Summary B:\nsecond\n").unwrap();
        assert!(p.find("Post:\nThe post.").unwrap() < a && a < b);
        assert!(p.contains("most important points"));
        assert!(p.ends_with("Preferred: <\"A\" or \"B\">"));
    }

    #[test]
    fn post_text_drops_tldr_cue() {
        let prompt = "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: body text\n\nTL;DR:";
        assert_eq!(
            post_text(prompt),
            "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: body text"
        );
        assert_eq!(post_text("no cue here "), "no cue here");
    }

    #[test]
    fn flips_are_seeded_and_balanced() {
        let n = 2000;
        let flips = (0..n).filter(|i| flip_for(7, &i.to_string())).count();
        assert!((800..1200).contains(&flips), "{flips}");
        assert_eq!(flip_for(7, "abc"), flip_for(7, "abc"));
        let differ = (0..64)
            .filter(|i| flip_for(1, &i.to_string()) != flip_for(2, &i.to_string()))
            .count();
        assert!(differ > 10, "{differ}");
    }

    #[test]
    fn parses_lenient_forms() {
        use Position::*;
        let cases = [
            ("Comparison: A is shorter.\nPreferred: A", Some(A)),
            ("Comparison: x\nPreferred: B", Some(B)),
            ("Comparison: x\npreferred:b", Some(B)),
            ("Comparison: x\n  PREFERRED :  \"A\".  ", Some(A)),
            ("Comparison: x\nPreferred: 'B'!", Some(B)),
            ("Comparison: x\n**Preferred:** A", Some(A)),
            ("Comparison: x\nPreferred: **B**", Some(B)),
            ("Comparison: x\nPreferred: \u{201c}A\u{201d}", Some(A)),
            ("Comparison: x\nPreferred:\n\nB\n", Some(B)),
            ("Comparison: x\r\nPreferred: A\r\n", Some(A)),
            ("Preferred: A\nPreferred: A", Some(A)),
            // unparseable
            ("Comparison: both are fine.", None),
            ("Comparison: x\nPreferred: Summary A", None),
            ("Comparison: x\nPreferred: Both", None),
            ("Comparison: x\nPreferred: A or B", None),
            ("Comparison: x\nPreferred:", None),
            ("Preferred: A\nPreferred: B", None),
            ("I preferred A.", None),
            ("", None),
        ];
        for (reply, want) in cases {
            assert_eq!(parse_preferred(reply), want, "{reply:?}");
        }
    }
}
