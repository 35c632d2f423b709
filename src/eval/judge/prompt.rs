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

/// The full judging prompt (a single user message) for a post and the summaries shown as A and B,
/// in this crate's wording.
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

/// The placeholders of a prompt template, in the order [`PromptTemplate::render`] fills them.
pub const PLACEHOLDERS: [&str; 3] = ["{post}", "{summary_a}", "{summary_b}"];

/// A judging prompt of the user's own wording (e.g. the DPO paper's published prompt, word for
/// word), read from a text file with the placeholders `{post}`, `{summary_a}` and `{summary_b}`.
/// Each must occur exactly once; the replies must still end in a `Preferred: A|B` line (see
/// [`parse_preferred`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    text: String,
}

impl PromptTemplate {
    /// Check a template's text; `origin` names it in errors (e.g. the file's path).
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        for ph in PLACEHOLDERS {
            let n = text.matches(ph).count();
            if n != 1 {
                anyhow::bail!(
                    "judge prompt template {origin}: the placeholder {ph} must occur exactly once, \
                     found {n} times (placeholders: {})",
                    PLACEHOLDERS.join(", ")
                );
            }
        }
        Ok(Self {
            text: text.to_string(),
        })
    }

    /// Read and check a template file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read judge prompt template {}: {e}", path.display())
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The prompt for a post and the summaries shown as A and B (each trimmed). The template is
    /// scanned once, so a summary that happens to contain a placeholder is left as it is.
    pub fn render(&self, post: &str, summary_a: &str, summary_b: &str) -> String {
        let values = [post.trim(), summary_a.trim(), summary_b.trim()];
        let mut out =
            String::with_capacity(self.text.len() + values.iter().map(|v| v.len()).sum::<usize>());
        let mut rest = self.text.as_str();
        while let Some((at, i)) = PLACEHOLDERS
            .iter()
            .enumerate()
            .filter_map(|(i, ph)| rest.find(ph).map(|at| (at, i)))
            .min()
        {
            out.push_str(&rest[..at]);
            out.push_str(values[i]);
            rest = &rest[at + PLACEHOLDERS[i].len()..];
        }
        out.push_str(rest);
        out
    }
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
    let v = v.trim_matches(is_decoration);
    // An optional "Summary" / "Option" before the letter ("Summary A").
    let v = ["summary", "option"]
        .iter()
        .find_map(|w| {
            let head = v.get(..w.len())?;
            let tail = &v[w.len()..];
            (head.eq_ignore_ascii_case(w) && tail.starts_with(char::is_whitespace))
                .then(|| tail.trim_start_matches(is_decoration))
        })
        .unwrap_or(v);
    let mut chars = v.chars();
    let p = match chars.next()? {
        'A' | 'a' => Position::A,
        'B' | 'b' => Position::B,
        _ => return None,
    };
    // After the letter: nothing, or a remark in brackets or after a dash ("A (more concise)",
    // "B - it is shorter"); anything else ("A or B", "Both") is not a choice.
    let tail = chars.as_str().trim_start_matches(is_decoration);
    (tail.is_empty() || tail.starts_with(['(', '[', '-', '\u{2013}', '\u{2014}'])).then_some(p)
}

/// Read the preference from a judge's reply: the value of its `Preferred:` line(s).
///
/// Lenient about case (`preferred: b`), whitespace, quotes (`"A"`, `'B'`, curly quotes),
/// markdown emphasis (`**Preferred:** A`) and trailing punctuation (`A.`); a label with an
/// empty value takes the next non-empty line; a leading `Summary` or `Option` (`Summary A`) and
/// a remark after the letter in brackets or after a dash (`A (more concise)`) are allowed.
/// Anything else is unparseable (`None`): no such line, a value other than A or B (e.g. `Both`,
/// `A or B`, `Summary C`), or several lines that disagree.
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
    fn templates_fill_each_placeholder_once() {
        let t = PromptTemplate::parse(
            "Post: {post}\nFirst: {summary_a}\nSecond: {summary_b}\nPreferred: A or B?",
            "t.txt",
        )
        .unwrap();
        assert_eq!(
            t.render(" the post ", "a {summary_b}", "b"),
            "Post: the post\nFirst: a {summary_b}\nSecond: b\nPreferred: A or B?"
        );
        for bad in [
            "{post} {summary_a}",
            "{post} {summary_a} {summary_b} {post}",
        ] {
            let e = PromptTemplate::parse(bad, "bad.txt")
                .unwrap_err()
                .to_string();
            assert!(e.contains("bad.txt") && e.contains("exactly once"), "{e}");
        }
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
            ("Comparison: x\nPreferred: Summary A", Some(A)),
            ("Comparison: x\nPreferred: **Summary B**", Some(B)),
            ("Comparison: x\nPreferred: option b.", Some(B)),
            ("Comparison: x\nPreferred: A (more concise)", Some(A)),
            (
                "Comparison: x\nPreferred: B - it keeps the key point",
                Some(B),
            ),
            ("Comparison: x\nPreferred: \"B\" [shorter]", Some(B)),
            // unparseable
            ("Comparison: both are fine.", None),
            ("Comparison: x\nPreferred: Summary C", None),
            ("Comparison: x\nPreferred: Summary", None),
            ("Comparison: x\nPreferred: Summary A or B", None),
            ("Comparison: x\nPreferred: Options A", None),
            ("Comparison: x\nPreferred: Absolutely A", None),
            ("Comparison: x\nPreferred: AB", None),
            ("Comparison: x\nPreferred: B, A", None),
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
