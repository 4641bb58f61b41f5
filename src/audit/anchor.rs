//! Shipping checkpoints off the database (`audit.anchor_*`), and reading them back for `audit verify`.
//!
//! Every checkpoint the server signs (every `audit.checkpoint_interval_secs`) is sent to each configured sink as
//! one JSON line, `{"checkpoint": {…}, "public_key": "…", "sealed_from": N}` (`sealed_from`: the seal
//! transition point, so a trail passed off as one from before seals is refused):
//! - `audit.anchor_dir`: appended to `DIR/carevault-checkpoints.ndjson` (created 0600, opened append-only,
//!   fsynced, the directory fsynced when the file is new). Put it on another volume, ideally one the database
//!   administrators cannot write (a WORM mount, another host's NFS export with append-only attributes).
//! - `audit.anchor_webhook_url`: POSTed as `application/json`; retried with backoff (1 s, 2 s, 4 s, 8 s) until
//!   a 2xx answer; a checkpoint that still fails is logged (no content) and the next one is sent regardless.
//!
//! `audit verify` reads every line of the anchor file and requires the trail to pass through each checkpoint.

use super::chain::Checkpoint;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The anchor file inside `audit.anchor_dir`.
pub const ANCHOR_FILE: &str = "carevault-checkpoints.ndjson";
/// Webhook attempts per checkpoint.
const ATTEMPTS: u32 = 5;

/// One anchor line.
pub fn line(cp: &Checkpoint, public_key: &str, sealed_from: Option<i64>) -> String {
    json!({ "checkpoint": cp, "public_key": public_key, "sealed_from": sealed_from }).to_string()
}

/// Appends `line` to the anchor file in `dir` and makes it durable.
pub fn append_to_dir(dir: &Path, line: &str) -> std::io::Result<()> {
    let path = dir.join(ANCHOR_FILE);
    let new = !path.exists();
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_all()?;
    if new {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A shipped anchor read back: the checkpoint and the seal transition point it names.
#[derive(Debug, Clone)]
pub struct Shipped {
    pub checkpoint: Checkpoint,
    pub sealed_from: Option<i64>,
}

/// Parses one anchor line (also the plain output of `audit checkpoint`, or a bare checkpoint object).
pub fn parse(text: &str) -> Option<Shipped> {
    let mut value: Value = serde_json::from_str(text).ok()?;
    let sealed_from = value.get("sealed_from").and_then(Value::as_i64);
    if let Some(inner) = value.get_mut("checkpoint") {
        value = inner.take();
    }
    Some(Shipped { checkpoint: serde_json::from_value(value).ok()?, sealed_from })
}

/// Every anchor shipped to `dir`, oldest first (empty when nothing was shipped yet); `Err` when a line is not
/// an anchor (fail closed: a damaged sink is reported, not skipped).
pub fn all_in_dir(dir: &Path) -> Result<Vec<Shipped>, String> {
    let path = dir.join(ANCHOR_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(_) => return Err(format!("cannot read the anchor file {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse(l).ok_or_else(|| format!("line {} of {} is not a checkpoint", i + 1, path.display())))
        .collect()
}

/// The configured sinks.
#[derive(Debug, Clone, Default)]
pub struct Shipper {
    dir: Option<PathBuf>,
    webhook: Option<(reqwest::Client, reqwest::Url)>,
}

impl Shipper {
    /// From `audit.anchor_dir` and `audit.anchor_webhook_url`; an unusable URL is logged (never echoed) and
    /// left out.
    pub fn from_config(cfg: &crate::config::Config) -> Shipper {
        let webhook = cfg.audit.anchor_webhook_url.as_deref().and_then(|u| {
            let url = reqwest::Url::parse(u).ok()?;
            let https = url.scheme() == "https";
            let plain_allowed = url.scheme() == "http" && cfg.profile != crate::config::Profile::Production;
            if !(https || plain_allowed) {
                tracing::error!("`audit.anchor_webhook_url` must be https (http only in development); not used");
                return None;
            }
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .https_only(https)
                .build()
                .ok()?;
            Some((client, url))
        });
        Shipper { dir: cfg.audit.anchor_dir.clone(), webhook }
    }

    pub fn is_empty(&self) -> bool {
        self.dir.is_none() && self.webhook.is_none()
    }

    /// Sends one anchor line to every sink; returns whether all of them took it.
    pub async fn ship(&self, line: &str) -> bool {
        let mut ok = true;
        if let Some(dir) = &self.dir {
            let (dir, text) = (dir.clone(), line.to_owned());
            let written = tokio::task::spawn_blocking(move || append_to_dir(&dir, &text)).await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::error!("audit anchor could not be appended to `audit.anchor_dir`");
                ok = false;
            }
        }
        if let Some((client, url)) = &self.webhook {
            let mut delivered = false;
            for attempt in 0..ATTEMPTS {
                let sent = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .body(line.to_owned())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    delivered = true;
                    break;
                }
                if attempt + 1 < ATTEMPTS {
                    tokio::time::sleep(std::time::Duration::from_secs(1 << attempt)).await;
                }
            }
            if !delivered {
                tracing::error!(audit.anchor_attempts = ATTEMPTS, "audit anchor could not be delivered to the webhook");
                ok = false;
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_anchor_file_is_appended_and_read_back_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        assert!(all_in_dir(dir.path()).unwrap().is_empty());
        let (signer, _) = crate::audit::CheckpointSigner::generate().unwrap();
        let at = time::macros::datetime!(2026-03-01 09:00 UTC);
        for seq in [3, 9] {
            let cp = signer.sign(seq, [seq as u8; 32], at);
            append_to_dir(dir.path(), &line(&cp, "pk", Some(2))).unwrap();
        }
        let newest = all_in_dir(dir.path()).unwrap().pop().unwrap();
        assert_eq!((newest.checkpoint.seq, newest.sealed_from), (9, Some(2)));
        let text = std::fs::read_to_string(dir.path().join(ANCHOR_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2);
        std::fs::write(dir.path().join(ANCHOR_FILE), format!("{text}garbage\n")).unwrap();
        assert!(all_in_dir(dir.path()).is_err(), "a damaged sink fails closed");
    }
}
