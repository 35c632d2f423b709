//! A judge behind an OpenAI-compatible chat-completions endpoint
//! (`POST {base_url}/chat/completions`).
//!
//! Request: `{"model", "messages": [{"role": "user", "content": <prompt>}], "temperature",
//! "max_tokens"}` with `Authorization: Bearer <key>` when a key is configured. Reply: the text
//! of `choices[0].message.content`, and `usage.prompt_tokens` / `usage.completion_tokens`.
//!
//! The token limit is sent as `max_tokens`, or as `max_completion_tokens` for the newer models
//! that reject the former (`token_limit_param`). The prompt is this crate's wording, or the
//! user's own from a template file (`prompt_template`, see [`PromptTemplate`]).
//!
//! Failure handling, per comparison:
//! * retried with exponential backoff (`backoff_base_ms * 2^k`, capped at `backoff_cap_ms`,
//!   times a random factor in [0.5, 1]): timeouts, connection errors, HTTP 408, 409, 429 and
//!   5xx; a `retry-after-ms: <milliseconds>` or `Retry-After: <seconds | HTTP date>` header on those
//!   replaces the backoff (capped at `max_retry_after_s`). After `max_retries` retries the
//!   comparison is recorded as failed.
//! * not retried, recorded as failed with the status: other non-2xx statuses (e.g. 400).
//! * fatal for the batch: 401, 403, 404 and a 429 whose error is `insufficient_quota` (no
//!   credit left). They would fail every other comparison the same way, so no further request is
//!   started; the comparisons not yet asked are recorded as failed, naming the first error, and
//!   a re-run (with the cache) asks them once the cause is fixed. A 404 says which URL was used,
//!   as it usually means a base URL without its `/v1`.
//! * not retried, recorded as failed: a 2xx body that is not chat-completions JSON, a refusal
//!   (`message.refusal`, content null), and a reply cut at the token limit
//!   (`finish_reason: "length"`) without a readable `Preferred:` line. Their billed tokens are
//!   kept in the verdict, and they are not cached, so a re-run asks again.
//! * recorded as unparseable: a complete reply whose text has no readable `Preferred:` line.
//!
//! Proxies: the request goes through `proxy` when set (`""` or `"none"`: never), else through
//! the proxy the environment names for the URL's scheme (`https_proxy` / `HTTPS_PROXY`,
//! `http_proxy` / `HTTP_PROXY`, then `all_proxy` / `ALL_PROXY`), unless the host is a loopback
//! address or matches `no_proxy` / `NO_PROXY` (see [`proxy_for`]).
//!
//! The API key goes only into the `Authorization` header. It is never serialized
//! ([`OpenAiJudgeConfig`] skips it), never shown by `Debug`, and any occurrence of it in a
//! server's reply or error body is replaced by `<redacted>` before the text is kept anywhere.

use super::cache::{CACHE_VERSION, CacheEntry, VerdictCache, cache_key};
use super::prompt::{PromptTemplate, flip_for, parse_preferred, post_text, render};
use super::{
    Judge, JudgeItem, JudgeReport, JudgeSummary, Prices, Usage, Verdict, check_unique_ids,
};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Base URL used when neither the config nor `OPENAI_BASE_URL` names one.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The paper's judge: the dated snapshot its section 5 names, not the moving alias.
pub const DEFAULT_MODEL: &str = "gpt-4-turbo-2024-04-09";
/// Environment variable read for the base URL when the config has none.
pub const BASE_URL_ENV: &str = "OPENAI_BASE_URL";

const REDACTED: &str = "<redacted>";

/// An API key. `Debug` prints `ApiKey(<redacted>)`; it has no `Display` and no `Serialize`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({REDACTED})")
    }
}

/// Settings of [`OpenAiJudge`]. Every field has a default, so a TOML/JSON config may name only
/// what it changes. `api_key` is read from config files but never written back out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiJudgeConfig {
    /// Judge model name sent to the server.
    pub model: String,
    /// e.g. `https://api.openai.com/v1`; the request goes to `{base_url}/chat/completions`.
    /// When unset: `$OPENAI_BASE_URL`, else [`DEFAULT_BASE_URL`].
    pub base_url: Option<String>,
    /// The API key. When unset, the environment variable named by `api_key_env` is read; with
    /// neither, requests carry no `Authorization` header (fine for local servers).
    #[serde(skip_serializing)]
    pub api_key: Option<ApiKey>,
    /// Environment variable holding the key (default `OPENAI_API_KEY`); empty to read none.
    pub api_key_env: String,
    /// Sampling temperature of the judge (the protocol uses 0).
    pub temperature: f64,
    /// Token limit of the judge's reply.
    pub max_tokens: u32,
    /// The request field that carries `max_tokens`: `"max_tokens"` (GPT-4, most servers) or
    /// `"max_completion_tokens"` (OpenAI's newer models reject `max_tokens`).
    pub token_limit_param: String,
    /// A text file with the judging prompt in the user's own wording, with the placeholders
    /// `{post}`, `{summary_a}`, `{summary_b}`; unset: this crate's prompt.
    pub prompt_template: Option<PathBuf>,
    /// Proxy URL for the requests (e.g. `http://proxy:3128`); `""` or `"none"`: no proxy; unset:
    /// the environment's proxy variables (see the module documentation).
    pub proxy: Option<String>,
    /// Seed of the per-comparison order (combined with each item's id).
    pub seed: u64,
    /// Requests in flight at most (worker threads).
    pub concurrency: usize,
    /// Retries after the first request of a comparison.
    pub max_retries: u32,
    /// First backoff delay, doubled per retry, capped at `backoff_cap_ms`, then jittered.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Upper bound on a server's `Retry-After`.
    pub max_retry_after_s: f64,
    /// TCP connect timeout.
    pub connect_timeout_ms: u64,
    /// Timeout of each socket read and write (a stalled server times out after this long).
    pub read_timeout_ms: u64,
    /// Folder of cached replies; no caching when unset.
    pub cache_dir: Option<PathBuf>,
    /// Prices per 1000 prompt / completion tokens, for the reported cost.
    pub price_prompt_per_1k: f64,
    pub price_completion_per_1k: f64,
}

impl Default for OpenAiJudgeConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            base_url: None,
            api_key: None,
            api_key_env: "OPENAI_API_KEY".to_string(),
            temperature: 0.0,
            max_tokens: 256,
            token_limit_param: TOKEN_LIMIT_PARAMS[0].to_string(),
            prompt_template: None,
            proxy: None,
            seed: 0,
            concurrency: 4,
            max_retries: 6,
            backoff_base_ms: 1000,
            backoff_cap_ms: 60_000,
            max_retry_after_s: 600.0,
            connect_timeout_ms: 10_000,
            read_timeout_ms: 120_000,
            cache_dir: None,
            price_prompt_per_1k: 0.0,
            price_completion_per_1k: 0.0,
        }
    }
}

impl OpenAiJudgeConfig {
    pub fn prices(&self) -> Prices {
        Prices {
            prompt_per_1k: self.price_prompt_per_1k,
            completion_per_1k: self.price_completion_per_1k,
        }
    }
}

/// The accepted values of [`OpenAiJudgeConfig::token_limit_param`].
pub const TOKEN_LIMIT_PARAMS: [&str; 2] = ["max_tokens", "max_completion_tokens"];

/// Whether `host` (as in a URL, IPv6 in brackets or not) is a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The scheme and host of an `http(s)://` URL.
fn scheme_and_host(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if hostport.starts_with('[') {
        hostport
            .split_once(']')
            .map_or(hostport, |(h, _)| &hostport[..h.len() + 1])
    } else {
        hostport.split(':').next().unwrap_or(hostport)
    };
    Some((scheme, host))
}

/// Whether a `no_proxy` list (comma-separated hosts or domain suffixes, `*` for all) covers
/// `host`: `example.com` and `.example.com` both cover `example.com` and `api.example.com`.
fn no_proxy_covers(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry
            .split(':')
            .next()
            .unwrap_or(entry)
            .to_ascii_lowercase();
        let domain = entry.trim_start_matches("*.").trim_start_matches('.');
        entry == "*"
            || (!domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}"))))
    })
}

/// The proxy for requests to `base_url`, and where it came from (for errors): the configured
/// one (`""` / `"none"`: none), else the environment's for the URL's scheme, unless the host is
/// a loopback address or matches `no_proxy`.
/// Seconds since the Unix epoch of an HTTP date in the IMF-fixdate form of RFC 9110
/// (`Wed, 21 Oct 2015 07:28:00 GMT`); None for anything else.
pub fn http_date_unix(s: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let rest = s.trim().split_once(", ")?.1;
    let f: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = f.as_slice() else {
        return None;
    };
    let num = |t: &str, len: usize| -> Option<i64> {
        (t.len() == len && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let (d, y) = (num(day, 2)?, num(year, 4)?);
    let m = MONTHS.iter().position(|n| n == month)? as i64 + 1;
    let hms: Vec<&str> = time.split(':').collect();
    let [h, mi, se] = hms.as_slice() else {
        return None;
    };
    let (h, mi, se) = (num(h, 2)?, num(mi, 2)?, num(se, 2)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=month_days[m as usize - 1]).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar, March-based years).
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

pub fn proxy_for(
    base_url: &str,
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<(String, String)> {
    if let Some(p) = configured {
        let p = p.trim();
        return (!p.is_empty() && !p.eq_ignore_ascii_case("none"))
            .then(|| (p.to_string(), "the judge config's `proxy`".to_string()));
    }
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let (scheme, host) = scheme_and_host(base_url)?;
    if is_loopback_host(host) {
        return None;
    }
    if ["no_proxy", "NO_PROXY"]
        .iter()
        .any(|n| get(n).is_some_and(|l| no_proxy_covers(&l, host)))
    {
        return None;
    }
    let names: &[&str] = if scheme.eq_ignore_ascii_case("https") {
        &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        &["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
    };
    names
        .iter()
        .find_map(|n| get(n).map(|v| (v.trim().to_string(), format!("${n}"))))
}

type Sleeper = Arc<dyn Fn(Duration) + Send + Sync>;

/// The chat-completions judge. See the module documentation for the protocol.
pub struct OpenAiJudge {
    config: OpenAiJudgeConfig,
    base_url: String,
    endpoint: String,
    api_key: Option<ApiKey>,
    agent: ureq::Agent,
    /// The proxy in use and where it came from (for the summary and errors).
    proxy: Option<(String, String)>,
    template: Option<PromptTemplate>,
    sleeper: Sleeper,
}

impl std::fmt::Debug for OpenAiJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiJudge")
            .field("model", &self.config.model)
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One comparison to fetch (deduplicated by cache key).
struct Job {
    key: String,
    flipped: bool,
    body: String,
}

/// What came back for a job.
enum Fetched {
    Reply {
        content: String,
        usage: Usage,
        response_model: Option<String>,
    },
    Failed {
        error: String,
        http_status: Option<u16>,
        /// Tokens billed for a 2xx reply that could not be used (a refusal, a cut reply).
        usage: Usage,
        /// The error would recur on every comparison (bad key, no credit, wrong URL): stop
        /// starting requests.
        fatal: bool,
    },
}

impl Fetched {
    fn failed(error: String, http_status: Option<u16>) -> Fetched {
        Fetched::Failed {
            error,
            http_status,
            usage: Usage::default(),
            fatal: false,
        }
    }
}

/// The result of one HTTP request.
enum Step {
    Done(Fetched),
    Retry {
        error: String,
        http_status: Option<u16>,
        wait: Option<Duration>,
    },
}

impl OpenAiJudge {
    /// Build a judge, filling the base URL and the key from the environment where the config
    /// leaves them unset.
    pub fn new(config: OpenAiJudgeConfig) -> Result<Self> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// A judge configured from the environment alone (`OPENAI_API_KEY`, `OPENAI_BASE_URL`).
    pub fn from_env() -> Result<Self> {
        Self::new(OpenAiJudgeConfig::default())
    }

    fn with_env(
        mut config: OpenAiJudgeConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let base_url = config
            .base_url
            .clone()
            .or_else(|| nonempty(env(BASE_URL_ENV)))
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let base_url = base_url.trim().trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!("judge base URL {base_url:?} must start with http:// or https://");
        }
        let api_key = config.api_key.take().or_else(|| {
            if config.api_key_env.is_empty() {
                None
            } else {
                nonempty(env(&config.api_key_env)).map(ApiKey)
            }
        });
        if api_key
            .as_ref()
            .is_some_and(|k| k.0.chars().any(|c| c.is_control() || c == ' '))
        {
            bail!("judge API key contains whitespace or control characters");
        }
        if config.model.trim().is_empty() {
            bail!("judge model name is empty");
        }
        if base_url.contains(['?', '#']) {
            bail!(
                "judge base URL {base_url:?} has a query or fragment; give the URL that \
                 `/chat/completions` is appended to (e.g. https://api.openai.com/v1)"
            );
        }
        if !TOKEN_LIMIT_PARAMS.contains(&config.token_limit_param.as_str()) {
            bail!(
                "judge token_limit_param must be one of {TOKEN_LIMIT_PARAMS:?}, got {:?}",
                config.token_limit_param
            );
        }
        let template = config
            .prompt_template
            .as_deref()
            .map(PromptTemplate::from_file)
            .transpose()?;
        if config.max_retry_after_s.is_nan() || config.max_retry_after_s < 0.0 {
            bail!(
                "judge max_retry_after_s must be >= 0, got {}",
                config.max_retry_after_s
            );
        }
        let proxy = proxy_for(&base_url, config.proxy.as_deref(), &env);
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(config.connect_timeout_ms.max(1)))
            .timeout_read(Duration::from_millis(config.read_timeout_ms.max(1)))
            .timeout_write(Duration::from_millis(config.read_timeout_ms.max(1)))
            .redirects(0)
            .try_proxy_from_env(false);
        if let Some((url, origin)) = &proxy {
            let p = ureq::Proxy::new(url)
                .map_err(|e| anyhow::anyhow!("judge proxy {url:?} (from {origin}): {e}"))?;
            agent = agent.proxy(p);
        }
        let endpoint = format!("{base_url}/chat/completions");
        Ok(Self {
            config,
            base_url,
            endpoint,
            api_key,
            agent: agent.build(),
            proxy,
            template,
            sleeper: Arc::new(std::thread::sleep),
        })
    }

    /// Replace how the client waits between retries (default: `std::thread::sleep`); tests use
    /// it to record the delays instead of sleeping.
    pub fn with_sleeper(mut self, sleeper: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        self.sleeper = Arc::new(sleeper);
        self
    }

    /// The settings in use (the key removed).
    pub fn config(&self) -> &OpenAiJudgeConfig {
        &self.config
    }

    /// The resolved base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether requests carry an API key.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// The proxy the requests go through, if any, with where it was configured.
    pub fn proxy(&self) -> Option<(&str, &str)> {
        self.proxy.as_ref().map(|(u, o)| (u.as_str(), o.as_str()))
    }

    /// The judging prompt of an item and its order (true: candidate shown as B).
    pub fn prompt_for(&self, item: &JudgeItem) -> (String, bool) {
        let flipped = flip_for(self.config.seed, &item.id);
        let post = post_text(&item.prompt);
        let (a, b) = if flipped {
            (&item.reference, &item.candidate)
        } else {
            (&item.candidate, &item.reference)
        };
        let text = match &self.template {
            Some(t) => t.render(post, a, b),
            None => render(post, a, b),
        };
        (text, flipped)
    }

    /// Replace every occurrence of the key in text from the server.
    fn redact(&self, s: &str) -> String {
        match &self.api_key {
            Some(k) if !k.0.is_empty() && s.contains(&k.0) => s.replace(&k.0, REDACTED),
            _ => s.to_string(),
        }
    }

    /// A short, single-line, redacted excerpt of a body for error messages.
    fn excerpt(&self, body: &str) -> String {
        let one_line: String = body
            .chars()
            .take(300)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let more = if body.chars().count() > 300 {
            "..."
        } else {
            ""
        };
        self.redact(&format!("{}{more}", one_line.trim()))
    }

    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << retry.min(32));
        let capped = exp.min(self.config.backoff_cap_ms) as f64;
        let jitter = 0.5 + 0.5 * rand::random::<f64>();
        Duration::from_secs_f64(capped * jitter / 1000.0)
    }

    /// The wait a server asks for: `retry-after-ms` (milliseconds, OpenAI's) if present and
    /// valid, else `Retry-After` in seconds or as an HTTP date (until then; 0 when past);
    /// capped at `max_retry_after_s`.
    fn retry_after(&self, ms: Option<&str>, secs: Option<&str>) -> Option<Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.retry_after_at(ms, secs, now)
    }

    /// [`Self::retry_after`] at `now` (seconds since the Unix epoch).
    fn retry_after_at(&self, ms: Option<&str>, secs: Option<&str>, now: f64) -> Option<Duration> {
        let read = |v: Option<&str>, scale: f64| {
            let x: f64 = v?.trim().parse().ok()?;
            (x.is_finite() && x >= 0.0).then_some(x * scale)
        };
        let date = || http_date_unix(secs?).map(|t| (t as f64 - now).max(0.0));
        let s = read(ms, 1e-3).or_else(|| read(secs, 1.0)).or_else(date)?;
        Some(Duration::from_secs_f64(
            s.min(self.config.max_retry_after_s),
        ))
    }

    fn send_once(&self, body: &str) -> Step {
        let mut req = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &k.header_value());
        }
        match req.send_string(body) {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_string() {
                    Err(e) => Step::Retry {
                        error: self.redact(&format!("reading the response body failed: {e}")),
                        http_status: Some(status),
                        wait: None,
                    },
                    Ok(text) if (200..300).contains(&status) => {
                        Step::Done(self.parse_response(&text))
                    }
                    Ok(text) => Step::Done(Fetched::failed(
                        format!("HTTP {status}: {}", self.excerpt(&text)),
                        Some(status),
                    )),
                }
            }
            Err(ureq::Error::Status(code, resp)) => {
                let wait =
                    self.retry_after(resp.header("retry-after-ms"), resp.header("retry-after"));
                let text = resp.into_string().unwrap_or_default();
                let mut error = format!("HTTP {code}: {}", self.excerpt(&text));
                let no_credit = code == 429 && error_code(&text) == Some("insufficient_quota");
                if !no_credit && matches!(code, 408 | 409 | 429 | 500..=599) {
                    return Step::Retry {
                        error,
                        http_status: Some(code),
                        wait,
                    };
                }
                if code == 404 {
                    error.push_str(&format!(
                        " (the request went to {}: is the base URL right? OpenAI-compatible \
                         servers usually serve under /v1)",
                        self.endpoint
                    ));
                }
                Step::Done(Fetched::Failed {
                    error,
                    http_status: Some(code),
                    usage: Usage::default(),
                    fatal: no_credit || matches!(code, 401 | 403 | 404),
                })
            }
            Err(ureq::Error::Transport(t)) => {
                use ureq::ErrorKind as K;
                let error = self.redact(&format!("transport error: {t}"));
                match t.kind() {
                    K::Dns
                    | K::ConnectionFailed
                    | K::Io
                    | K::BadStatus
                    | K::BadHeader
                    | K::ProxyConnect => Step::Retry {
                        error,
                        http_status: None,
                        wait: None,
                    },
                    _ => Step::Done(Fetched::failed(error, None)),
                }
            }
        }
    }

    fn parse_response(&self, text: &str) -> Fetched {
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return Fetched::failed(
                    format!("response body is not JSON ({e}): {}", self.excerpt(text)),
                    None,
                );
            }
        };
        let tokens = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
        let usage = Usage {
            prompt_tokens: tokens("/usage/prompt_tokens"),
            completion_tokens: tokens("/usage/completion_tokens"),
        };
        let failed = |error: String| Fetched::Failed {
            error,
            http_status: None,
            usage,
            fatal: false,
        };
        let message = v.pointer("/choices/0/message");
        let refusal = message
            .and_then(|m| m.get("refusal"))
            .and_then(|r| r.as_str())
            .filter(|r| !r.trim().is_empty());
        let content = message
            .and_then(|m| m.get("content"))
            .and_then(|c| c.as_str());
        let content = match (content, refusal) {
            (Some(c), None) => c,
            (Some(c), Some(_)) if !c.trim().is_empty() => c,
            (_, Some(r)) => {
                return failed(format!("the judge refused: {}", self.excerpt(r)));
            }
            (None, None) => {
                return failed(format!(
                    "response JSON has no choices[0].message.content: {}",
                    self.excerpt(text)
                ));
            }
        };
        let finish = v
            .pointer("/choices/0/finish_reason")
            .and_then(|f| f.as_str());
        if finish == Some("length") && parse_preferred(content).is_none() {
            return failed(format!(
                "the reply was cut at the token limit ({} = {}, finish_reason \"length\") before \
                 a `Preferred:` line; raise max_tokens. The reply began: {}",
                self.config.token_limit_param,
                self.config.max_tokens,
                self.excerpt(content)
            ));
        }
        Fetched::Reply {
            content: self.redact(content),
            usage,
            response_model: v
                .get("model")
                .and_then(|m| m.as_str())
                .map(|m| self.redact(m)),
        }
    }

    /// One comparison with retries: the outcome and the number of requests made.
    fn fetch(&self, body: &str) -> (Fetched, u32) {
        let mut requests = 0u32;
        loop {
            requests += 1;
            match self.send_once(body) {
                Step::Done(f) => return (f, requests),
                Step::Retry {
                    error,
                    http_status,
                    wait,
                } => {
                    if requests > self.config.max_retries {
                        let error =
                            format!("gave up after {requests} requests; last error: {error}");
                        return (Fetched::failed(error, http_status), requests);
                    }
                    (self.sleeper)(wait.unwrap_or_else(|| self.backoff(requests - 1)));
                }
            }
        }
    }

    fn request_body(&self, prompt: &str) -> String {
        let mut body = serde_json::json!({
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.config.temperature,
        });
        body[self.config.token_limit_param.as_str()] = self.config.max_tokens.into();
        body.to_string()
    }
}

/// `error.code` (else `error.type`) of an OpenAI-style error body.
fn error_code(body: &str) -> Option<&'static str> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    let code = e
        .get("code")
        .and_then(|c| c.as_str())
        .or_else(|| e.get("type").and_then(|c| c.as_str()))?;
    // Only the codes this client acts on are returned (as static strings).
    ["insufficient_quota"].into_iter().find(|k| *k == code)
}

impl Judge for OpenAiJudge {
    fn judge(&self, items: &[JudgeItem]) -> Result<JudgeReport> {
        check_unique_ids(items)?;
        let cache = self
            .config
            .cache_dir
            .as_deref()
            .map(VerdictCache::open)
            .transpose()?;
        let cfg = &self.config;

        // Deduplicate comparisons by cache key: identical comparisons are fetched once.
        let mut jobs: Vec<Job> = Vec::new();
        let mut job_of_key: HashMap<String, usize> = HashMap::new();
        let mut job_of_item: Vec<usize> = Vec::with_capacity(items.len());
        for item in items {
            let (prompt, flipped) = self.prompt_for(item);
            let key = cache_key(
                &self.base_url,
                &cfg.model,
                cfg.temperature,
                cfg.max_tokens,
                flipped,
                &prompt,
            );
            let j = *job_of_key.entry(key.clone()).or_insert_with(|| {
                jobs.push(Job {
                    key,
                    flipped,
                    body: self.request_body(&prompt),
                });
                jobs.len() - 1
            });
            job_of_item.push(j);
        }

        // Cache lookups, then a bounded pool of workers for the rest.
        let mut results: Vec<Option<(Fetched, u32)>> = jobs
            .iter()
            .map(|job| {
                let hit = cache.as_ref()?.get(&job.key)?;
                Some((
                    Fetched::Reply {
                        content: hit.reply,
                        usage: hit.usage,
                        response_model: hit.response_model,
                    },
                    0,
                ))
            })
            .collect();
        let pending: Vec<usize> = (0..jobs.len()).filter(|&j| results[j].is_none()).collect();
        let workers = cfg.concurrency.max(1).min(pending.len());
        let next = AtomicUsize::new(0);
        // The first fatal error (bad key, no credit, wrong URL): no request starts after it.
        let stop: Mutex<Option<String>> = Mutex::new(None);
        let (tx, rx) = mpsc::channel::<(usize, (Fetched, u32))>();
        std::thread::scope(|s| {
            for _ in 0..workers {
                let tx = tx.clone();
                let (next, pending, jobs, cache, stop) = (&next, &pending, &jobs, &cache, &stop);
                s.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&j) = pending.get(i) else { break };
                        let job = &jobs[j];
                        let stopped = stop.lock().map_or(None, |g| g.clone());
                        let (fetched, requests) = match stopped {
                            Some(first) => (
                                Fetched::failed(
                                    format!(
                                        "not requested: the batch stopped after a fatal error \
                                         on another comparison ({first})"
                                    ),
                                    None,
                                ),
                                0,
                            ),
                            None => self.fetch(&job.body),
                        };
                        if let Fetched::Failed {
                            error, fatal: true, ..
                        } = &fetched
                            && let Ok(mut g) = stop.lock()
                        {
                            g.get_or_insert_with(|| error.clone());
                        }
                        if let (
                            Some(cache),
                            Fetched::Reply {
                                content,
                                usage,
                                response_model,
                            },
                        ) = (cache, &fetched)
                        {
                            let entry = CacheEntry {
                                version: CACHE_VERSION,
                                key: job.key.clone(),
                                model: self.config.model.clone(),
                                flipped: job.flipped,
                                reply: content.clone(),
                                usage: *usage,
                                response_model: response_model.clone(),
                                created_unix: SystemTime::now()
                                    .duration_since(UNIX_EPOCH)
                                    .map_or(0, |d| d.as_secs()),
                            };
                            if let Err(e) = cache.put(&entry) {
                                eprintln!("warning: judge cache: {e:#}");
                            }
                        }
                        if tx.send((j, (fetched, requests))).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        drop(tx);
        for (j, r) in rx {
            results[j] = Some(r);
        }

        // One verdict per item; a job's requests are charged to its first item only.
        let mut charged = vec![false; jobs.len()];
        let mut verdicts = Vec::with_capacity(items.len());
        for (item, &j) in items.iter().zip(&job_of_item) {
            let Some((fetched, requests)) = &results[j] else {
                bail!(
                    "internal error: comparison for item {:?} was never fetched",
                    item.id
                );
            };
            let flipped = jobs[j].flipped;
            let mut v = match fetched {
                Fetched::Reply {
                    content,
                    usage,
                    response_model,
                } => {
                    let mut v = Verdict::from_reply(&item.id, flipped, content.clone(), *usage);
                    v.response_model = response_model.clone();
                    v
                }
                Fetched::Failed {
                    error,
                    http_status,
                    usage,
                    ..
                } => {
                    let mut v = Verdict::failed(&item.id, flipped, error.clone(), *http_status);
                    v.usage = *usage;
                    v
                }
            };
            let first = !std::mem::replace(&mut charged[j], true);
            v.cached = !first || *requests == 0;
            v.requests = if first { *requests } else { 0 };
            verdicts.push(v);
        }
        let summary = JudgeSummary::from_verdicts(&verdicts, cfg.prices());
        Ok(JudgeReport { verdicts, summary })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn config_and_environment_precedence() {
        let env = env_of(&[
            ("OPENAI_API_KEY", "sk-from-env-123"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let j = OpenAiJudge::with_env(OpenAiJudgeConfig::default(), &env).unwrap();
        assert_eq!(j.base_url(), "http://127.0.0.1:9/v1");
        assert_eq!(j.endpoint, "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(j.api_key, Some(ApiKey::new("sk-from-env-123")));

        let cfg = OpenAiJudgeConfig {
            base_url: Some("http://localhost:8000/v1".into()),
            api_key: Some(ApiKey::new("sk-from-config-456")),
            ..Default::default()
        };
        let j = OpenAiJudge::with_env(cfg, &env).unwrap();
        assert_eq!(j.base_url(), "http://localhost:8000/v1");
        assert_eq!(j.api_key, Some(ApiKey::new("sk-from-config-456")));
        assert!(
            j.config().api_key.is_none(),
            "the key is held once, outside the config"
        );

        let j = OpenAiJudge::with_env(OpenAiJudgeConfig::default(), env_of(&[])).unwrap();
        assert_eq!(j.base_url(), DEFAULT_BASE_URL);
        assert!(j.api_key.is_none());
        let cfg = OpenAiJudgeConfig {
            api_key_env: String::new(),
            ..Default::default()
        };
        assert!(OpenAiJudge::with_env(cfg, &env).unwrap().api_key.is_none());

        let cfg = OpenAiJudgeConfig {
            base_url: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(OpenAiJudge::with_env(cfg, &env).is_err());
    }

    #[test]
    fn key_is_never_serialized_or_debugged() {
        let secret = "sk-unit-SECRET-0a1b2c3d";
        let cfg: OpenAiJudgeConfig = toml::from_str(&format!(
            "model = \"m\"\napi_key = \"{secret}\"\nseed = 3\n"
        ))
        .unwrap();
        assert_eq!(cfg.api_key, Some(ApiKey::new(secret)));
        assert!(!format!("{cfg:?}").contains(secret));
        assert!(!serde_json::to_string(&cfg).unwrap().contains(secret));
        assert!(!toml::to_string(&cfg).unwrap().contains(secret));
        let j = OpenAiJudge::with_env(cfg, env_of(&[])).unwrap();
        let dbg = format!("{j:?} {j:#?}");
        assert!(!dbg.contains(secret) && dbg.contains(REDACTED), "{dbg}");
        assert_eq!(
            j.redact(&format!("echo {secret}!")),
            format!("echo {REDACTED}!")
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cfg = OpenAiJudgeConfig {
            backoff_base_ms: 100,
            backoff_cap_ms: 1000,
            ..Default::default()
        };
        let j = OpenAiJudge::with_env(cfg, env_of(&[])).unwrap();
        for retry in 0..40 {
            let full = (100u64 << retry.min(20)).min(1000) as f64 / 1000.0;
            let d = j.backoff(retry).as_secs_f64();
            assert!(
                d >= 0.5 * full - 1e-9 && d <= full + 1e-9,
                "retry {retry}: {d} vs {full}"
            );
        }
        assert_eq!(
            j.retry_after(None, Some(" 3 ")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            j.retry_after(None, Some("1.5")),
            Some(Duration::from_millis(1500))
        );
        // An HTTP date: the time until then, 0 once past, capped like seconds.
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(http_date_unix(date), Some(1_445_412_480));
        assert_eq!(
            j.retry_after_at(None, Some(date), 1_445_412_480.0 - 30.0),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            j.retry_after_at(None, Some(date), 1_445_412_480.0 + 5.0),
            Some(Duration::ZERO)
        );
        assert_eq!(
            j.retry_after_at(None, Some(date), 0.0),
            Some(Duration::from_secs(600))
        );
        assert_eq!(http_date_unix("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date_unix("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1_835_481_599)
        );
        for bad in [
            "Wed, 21 Oct 2015 07:28:00 UTC",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Mon, 29 Feb 2027 00:00:00 GMT",
            "Wed, 21 Okt 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed, 21 Oct 2015 7:28:00 GMT",
        ] {
            assert_eq!(http_date_unix(bad), None, "{bad}");
            assert_eq!(j.retry_after_at(None, Some(bad), 0.0), None, "{bad}");
        }
        assert_eq!(j.retry_after(None, Some("-1")), None);
        assert_eq!(
            j.retry_after(None, Some("100000")),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            j.retry_after(Some("250"), Some("3")),
            Some(Duration::from_millis(250)),
            "retry-after-ms wins"
        );
        assert_eq!(
            j.retry_after(Some("soon"), Some("3")),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn request_body_is_chat_completions() {
        let cfg = OpenAiJudgeConfig {
            model: "judge-x".into(),
            max_tokens: 99,
            ..Default::default()
        };
        let j = OpenAiJudge::with_env(cfg, env_of(&[])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j.request_body("hello")).unwrap();
        assert_eq!(v["model"], "judge-x");
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["messages"][0]["content"], "hello");
        assert_eq!(v["temperature"], 0.0);
        assert_eq!(v["max_tokens"], 99);
        assert!(v.get("max_completion_tokens").is_none());

        let cfg = OpenAiJudgeConfig {
            max_tokens: 99,
            token_limit_param: "max_completion_tokens".into(),
            ..Default::default()
        };
        let j = OpenAiJudge::with_env(cfg, env_of(&[])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j.request_body("hello")).unwrap();
        assert_eq!(v["max_completion_tokens"], 99);
        assert!(v.get("max_tokens").is_none());
        let cfg = OpenAiJudgeConfig {
            token_limit_param: "max_new_tokens".into(),
            ..Default::default()
        };
        let e = OpenAiJudge::with_env(cfg, env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token_limit_param") && e.contains("max_new_tokens"),
            "{e}"
        );
    }

    #[test]
    fn proxies_from_config_or_environment() {
        let env = env_of(&[
            ("HTTPS_PROXY", "http://corp-proxy:3128"),
            ("http_proxy", "http://plain-proxy:8080"),
            ("NO_PROXY", "internal.example, .lab.example:8000"),
        ]);
        let p =
            |url: &str, configured: Option<&str>| proxy_for(url, configured, &env).map(|(u, _)| u);
        assert_eq!(
            p("https://api.openai.com/v1", None).as_deref(),
            Some("http://corp-proxy:3128")
        );
        assert_eq!(
            p("http://vllm.example:8000/v1", None).as_deref(),
            Some("http://plain-proxy:8080")
        );
        for direct in [
            "http://127.0.0.1:9/v1",
            "http://localhost:8000/v1",
            "http://[::1]:8000/v1",
            "https://internal.example/v1",
            "https://judge.internal.example/v1",
            "http://gpu.lab.example:8000/v1",
            "https://user:pw@lab.example/v1",
        ] {
            assert_eq!(p(direct, None), None, "{direct}");
        }
        assert_eq!(
            p("https://notinternal.example/v1", None).as_deref(),
            Some("http://corp-proxy:3128")
        );
        assert_eq!(
            p("http://127.0.0.1:9/v1", Some("http://explicit:1")).as_deref(),
            Some("http://explicit:1")
        );
        assert_eq!(p("https://api.openai.com/v1", Some("none")), None);
        assert_eq!(p("https://api.openai.com/v1", Some("")), None);
        assert_eq!(
            proxy_for(
                "https://a.b/v1",
                None,
                env_of(&[("NO_PROXY", "*"), ("ALL_PROXY", "http://x:1")])
            ),
            None
        );
        let (url, origin) = proxy_for(
            "https://a.b/v1",
            None,
            env_of(&[("ALL_PROXY", "http://x:1")]),
        )
        .unwrap();
        assert_eq!(
            (url.as_str(), origin.as_str()),
            ("http://x:1", "$ALL_PROXY")
        );

        let cfg = OpenAiJudgeConfig {
            proxy: Some("bogus://proxy".into()),
            ..Default::default()
        };
        let e = OpenAiJudge::with_env(cfg, env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus://proxy") && e.contains("`proxy`"), "{e}");
        let cfg = OpenAiJudgeConfig {
            base_url: Some("https://x.openai.azure.com/openai?api-version=1".into()),
            ..Default::default()
        };
        let e = OpenAiJudge::with_env(cfg, env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("query"), "{e}");
    }

    #[test]
    fn error_codes_that_stop_a_batch() {
        assert_eq!(
            error_code(
                r#"{"error":{"message":"x","type":"insufficient_quota","code":"insufficient_quota"}}"#
            ),
            Some("insufficient_quota")
        );
        assert_eq!(
            error_code(r#"{"error":{"message":"x","type":"insufficient_quota"}}"#),
            Some("insufficient_quota")
        );
        assert_eq!(
            error_code(r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#),
            None
        );
        assert_eq!(error_code("not json"), None);
    }
}
