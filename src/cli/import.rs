//! `carevault import [--account USERNAME] FILE|DIR`: loads NDJSON files and JSON Bundles through the records
//! pipeline, exactly as a client's `POST /fhir` would: every chunk is one transaction Bundle executed as an existing
//! local account ([`caller`]), so each entry is decided, scoped, masked, encrypted and audited as that account.
//!
//! - NDJSON (`*.ndjson`, one resource a line): `--batch` resources a transaction, each entry a plain `POST`. A
//!   resource's `Type/id` is replaced by a `urn:uuid:` fullUrl, and references to it (in the same chunk) or to the
//!   resource it became (in an earlier chunk or run) are rewritten, so references between lines survive.
//! - JSON (`*.json`): a `transaction` or `batch` Bundle is posted as it is; a `collection` or `searchset` becomes a
//!   transaction of `POST`s (`urn:uuid:` fullUrls kept, other fullUrls replaced by new ones and references to them
//!   rewritten); a single resource becomes a one-entry transaction.
//!
//! Resumable: the state file (`<input>.import-state`, or `--state`) gets one line per completed chunk (file, byte
//! offset, chunk number, the ids created), written and synced after the chunk's transaction committed. A rerun skips
//! the chunks it names. A transaction is all-or-nothing, so a chunk is either fully in or not at all; the one window
//! is a crash between the commit and the state line, after which a rerun loads that chunk again. Ctrl-C finishes
//! the chunk in flight, records it, and stops.
//!
//! Refused entries are reported by chunk, entry index, status and the OperationOutcome's issue code, diagnostics
//! and element path: never a value. Any refusal makes the exit status non-zero; without `--keep-going` the import
//! stops at the first refused chunk. Allowed in every profile (an operator may load records in production): the
//! audit trail names the account for every entry and the operator (`cli:NAME`) for the run.

use super::{Cli, CliError, Context};
use crate::app::AppState;
use crate::auth::service::Account;
use crate::error::AppError;
use crate::records::{Caller, Done, Interaction, Operation};
use crate::store::schema::accounts;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The first line of a state file.
const STATE_VERSION: u32 = 1;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The local account (username) the import acts as: every entry is decided, masked and audited as it.
    #[arg(long, env = "CAREVAULT_IMPORT_ACCOUNT")]
    pub account: String,
    /// The state file that records completed chunks (default: the input path with `.import-state` appended).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Resources per transaction for NDJSON input.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Go on with the next chunk after a refused one (the exit status is still non-zero).
    #[arg(long)]
    pub keep_going: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// An NDJSON file, a JSON Bundle or resource, or a directory of them (`*.ndjson`, `*.json`, in name order).
    pub input: PathBuf,
}

/// One line of the state file: a chunk whose transaction committed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkRecord {
    pub file: String,
    pub offset: u64,
    pub chunk: usize,
    /// `Type/id` of every resource created, in entry order.
    pub ids: Vec<String>,
    /// NDJSON: the source `Type/id` of a line → the `Type/id` it was created as.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub map: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateHeader {
    carevault_import: u32,
    batch: u32,
}

/// What a state file says was done.
#[derive(Debug, Default)]
pub struct State {
    pub done: HashSet<(String, u64)>,
    pub map: HashMap<String, String>,
    pub records: Vec<ChunkRecord>,
}

/// Reads a state file (missing: nothing done). A last line cut short by a crash is ignored; any other unreadable
/// line, or a state written with another `--batch`, is refused.
pub fn read_state(path: &Path, batch: u32) -> Result<State, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(e).context(format!("cannot read the state file {}", path.display())),
    };
    let mut state = State::default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for (n, line) in lines.iter().enumerate() {
        let last = n + 1 == lines.len() && !text.ends_with('\n');
        if n == 0 {
            match serde_json::from_str::<StateHeader>(line) {
                Ok(h) if h.carevault_import == STATE_VERSION && h.batch == batch => continue,
                Ok(h) if h.carevault_import == STATE_VERSION => {
                    return Err(CliError::Message(format!(
                        "the state file {} was written with --batch {}: rerun with it (or another --state)",
                        path.display(),
                        h.batch
                    )));
                }
                _ => {
                    return Err(CliError::Message(format!("{} is not a carevault import state file", path.display())));
                }
            }
        }
        match serde_json::from_str::<ChunkRecord>(line) {
            Ok(r) => {
                state.done.insert((r.file.clone(), r.offset));
                state.map.extend(r.map.iter().map(|(k, v)| (k.clone(), v.clone())));
                state.records.push(r);
            }
            Err(_) if last => {}
            Err(_) => {
                return Err(CliError::Message(format!(
                    "the state file {} has an unreadable line {}",
                    path.display(),
                    n + 1
                )));
            }
        }
    }
    Ok(state)
}

/// Appends to the state file, syncing each line before the next chunk starts.
struct StateWriter {
    file: std::fs::File,
}

impl StateWriter {
    fn open(path: &Path, batch: u32) -> Result<Self, CliError> {
        if let Ok(text) = std::fs::read(path)
            && text.last().is_some_and(|b| *b != b'\n')
        {
            // A line cut short by a crash (its chunk is not counted as done) is cut off, so the next record
            // starts on a line of its own.
            let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let file = std::fs::OpenOptions::new().write(true).open(path).context("cannot repair the state file")?;
            file.set_len(keep as u64).and_then(|()| file.sync_data()).context("cannot repair the state file")?;
        }
        let fresh = std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .context(format!("cannot open the state file {}", path.display()))?;
        if fresh {
            let header = serde_json::to_string(&StateHeader { carevault_import: STATE_VERSION, batch })
                .context("cannot write the state file")?;
            writeln!(file, "{header}").and_then(|()| file.sync_data()).context("cannot write the state file")?;
        }
        Ok(Self { file })
    }

    fn record(&mut self, r: &ChunkRecord) -> Result<(), CliError> {
        let line = serde_json::to_string(r).context("cannot write the state file")?;
        writeln!(self.file, "{line}").and_then(|()| self.file.sync_data()).context("cannot write the state file")
    }
}

/// The default state file of an input: its path with `.import-state` appended.
pub fn default_state_path(input: &Path) -> PathBuf {
    let mut s = input.as_os_str().to_owned();
    s.push(".import-state");
    PathBuf::from(s)
}

/// The files an input names: itself, or a directory's `*.ndjson` and `*.json` files in name order.
pub fn input_files(input: &Path) -> Result<Vec<PathBuf>, CliError> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let entries = std::fs::read_dir(input).context(format!("cannot read {}", input.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "ndjson")))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CliError::Message(format!("{} holds no *.ndjson or *.json file", input.display())));
    }
    Ok(files)
}

fn is_ndjson(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("ndjson")
}

fn new_urn() -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v4())
}

/// Replaces every `reference` string found in `map` (recursively).
pub fn rewrite_references(value: &mut Value, map: &HashMap<String, String>) {
    match value {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                match v {
                    Value::String(s) if k == "reference" => {
                        if let Some(to) = map.get(s.as_str()) {
                            *s = to.clone();
                        }
                    }
                    _ => rewrite_references(v, map),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rewrite_references(v, map)),
        _ => {}
    }
}

fn source_of(resource: &Value) -> Option<String> {
    Some(format!("{}/{}", resource.get("resourceType")?.as_str()?, resource.get("id")?.as_str()?))
}

fn post_entry(full_url: Option<String>, mut resource: Value) -> Value {
    let rtype = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_owned();
    if let Value::Object(o) = &mut resource {
        o.remove("id");
    }
    let mut entry = json!({ "resource": resource, "request": { "method": "POST", "url": rtype } });
    if let Some(u) = full_url {
        entry["fullUrl"] = Value::String(u);
    }
    entry
}

/// A transaction of `POST`s for resources read from NDJSON lines. Returns the Bundle and, per entry, the source
/// `Type/id` (for the map a later chunk rewrites its references with).
pub fn resources_transaction(resources: Vec<Value>, known: &HashMap<String, String>) -> (Value, Vec<Option<String>>) {
    let sources: Vec<Option<String>> = resources.iter().map(source_of).collect();
    let mut local = known.clone();
    let urns: Vec<Option<String>> = sources
        .iter()
        .map(|s| {
            s.as_ref().map(|s| {
                let urn = new_urn();
                local.insert(s.clone(), urn.clone());
                urn
            })
        })
        .collect();
    let entries: Vec<Value> = resources
        .into_iter()
        .zip(urns)
        .map(|(mut r, urn)| {
            rewrite_references(&mut r, &local);
            post_entry(urn, r)
        })
        .collect();
    (json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }), sources)
}

/// The Bundle to post for one JSON file: a transaction or batch as it is; a collection or searchset as a
/// transaction of `POST`s; a single resource as a one-entry transaction.
pub fn bundle_for(document: Value) -> Result<Value, &'static str> {
    let rtype = document.get("resourceType").and_then(Value::as_str);
    if rtype.is_none() {
        return Err("not a FHIR resource (no resourceType)");
    }
    if rtype != Some("Bundle") {
        return Ok(resources_transaction(vec![document], &HashMap::new()).0);
    }
    match document.get("type").and_then(Value::as_str) {
        Some("transaction" | "batch") => Ok(document),
        Some("collection" | "searchset") => {
            let entries = document.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
            let mut map = HashMap::new();
            let mut kept = Vec::new();
            for e in entries {
                let Some(resource) = e.get("resource").cloned() else { continue };
                if e.pointer("/search/mode").and_then(Value::as_str) == Some("outcome")
                    || resource.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
                {
                    continue;
                }
                let full = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
                let urn = match full {
                    Some(u) if u.starts_with("urn:uuid:") => u,
                    other => {
                        let urn = new_urn();
                        if let Some(u) = other {
                            map.insert(u, urn.clone());
                        }
                        if let Some(s) = source_of(&resource) {
                            map.insert(s, urn.clone());
                        }
                        urn
                    }
                };
                kept.push((urn, resource));
            }
            let entry: Vec<Value> = kept
                .into_iter()
                .map(|(urn, mut r)| {
                    rewrite_references(&mut r, &map);
                    post_entry(Some(urn), r)
                })
                .collect();
            Ok(json!({ "resourceType": "Bundle", "type": "transaction", "entry": entry }))
        }
        _ => Err("a Bundle that is not a transaction, batch, collection or searchset"),
    }
}

/// One refused entry (or a whole refused chunk, `entry: None`): status and issue, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub entry: Option<usize>,
    pub status: u16,
    pub code: String,
    pub diagnostics: String,
    pub expression: Option<String>,
}

impl Refusal {
    fn from_outcome(entry: Option<usize>, status: u16, outcome: Option<&Value>) -> Self {
        let issue = outcome.and_then(|o| o.pointer("/issue/0"));
        let text = |k: &str| issue.and_then(|i| i.get(k)).and_then(Value::as_str).unwrap_or("").to_owned();
        let paths: Vec<&str> = issue
            .and_then(|i| i.get("expression"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let expression = (!paths.is_empty()).then(|| paths.join(", "));
        Self { entry, status, code: text("code"), diagnostics: text("diagnostics"), expression }
    }

    fn from_error(e: &AppError) -> Self {
        let outcome = crate::api::error::outcome_of(e);
        let mut r = Self::from_outcome(None, crate::api::error::status_of(e).as_u16(), Some(&outcome));
        if let AppError::InEntry { index, .. } = e {
            r.entry = Some(*index);
        }
        r
    }

    fn line(&self, file: &str, chunk: usize) -> String {
        let entry = self.entry.map_or_else(|| "the whole chunk".to_owned(), |i| format!("entry {i}"));
        let at = self.expression.as_deref().map(|p| format!(" (at {p})")).unwrap_or_default();
        format!("refused: {file} chunk {chunk}, {entry}: {} {}: {}{at}", self.status, self.code, self.diagnostics)
    }
}

/// What a posted chunk did: `Type/id` created per entry (`None` for a refused batch entry) and the refusals.
#[derive(Debug, Default)]
pub struct ChunkResult {
    pub created: Vec<Option<String>>,
    pub refused: Vec<Refusal>,
}

/// Reads a `transaction-response` or `batch-response`.
pub fn read_response(response: &Value) -> ChunkResult {
    let mut out = ChunkResult::default();
    let entries = response.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (i, e) in entries.iter().enumerate() {
        let status = e.pointer("/response/status").and_then(Value::as_str).unwrap_or("");
        let code: u16 = status.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or(0);
        if (200..300).contains(&code) {
            let location = e.pointer("/response/location").and_then(Value::as_str).unwrap_or("");
            let mut parts = location.trim_start_matches('/').split('/').skip_while(|p| *p == "fhir");
            let id = match (parts.next(), parts.next()) {
                (Some(t), Some(id)) if !t.is_empty() && !id.is_empty() => Some(format!("{t}/{id}")),
                _ => e.get("resource").and_then(source_of),
            };
            out.created.push(id);
        } else {
            out.created.push(None);
            out.refused.push(Refusal::from_outcome(Some(i), code, e.pointer("/response/outcome")));
        }
    }
    out
}

/// The caller an import acts as: the existing, enabled local account `username`, with its role and its
/// Practitioner/Patient links as a session principal would have them.
pub fn caller(state: &AppState, username: &str) -> Result<Caller, CliError> {
    let mut conn = super::connect(state)?;
    let account: Option<Account> = accounts::table
        .filter(accounts::username.eq(username))
        .select(Account::as_select())
        .first(&mut conn)
        .optional()?;
    let Some(account) = account else {
        return Err(CliError::Message(format!("no account named {username:?} (see `carevault users list`)")));
    };
    if account.disabled {
        return Err(CliError::Message(format!("the account {username:?} is disabled")));
    }
    let principal = account.principal(None, state.auth.issuer())?;
    Ok(Caller { principal, ip: None })
}

/// Counts and timing for the summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub created: BTreeMap<String, usize>,
    pub refused: usize,
    pub skipped_chunks: usize,
    pub chunks: usize,
}

struct Run<'a> {
    state: &'a AppState,
    caller: Caller,
    args: &'a ImportArgs,
    known: HashMap<String, String>,
    done: HashSet<(String, u64)>,
    writer: StateWriter,
    bar: indicatif::ProgressBar,
    summary: Summary,
    stop: Arc<AtomicBool>,
    failed: bool,
}

impl Run<'_> {
    fn report(&self, line: String) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// Posts one chunk; records it when its transaction (or batch) went through. `false`: stop the import.
    async fn chunk(
        &mut self,
        file: &str,
        offset: u64,
        number: usize,
        bundle: Value,
        sources: Vec<Option<String>>,
    ) -> Result<bool, CliError> {
        let entries = bundle.get("entry").and_then(Value::as_array).map_or(0, Vec::len);
        let body = bytes::Bytes::from(serde_json::to_vec(&bundle).context("cannot encode a Bundle")?);
        let op = Operation::new(self.caller.clone(), Interaction::Bundle { body });
        self.summary.chunks += 1;
        let result = match self.state.records.execute(op).await {
            Ok(Done::Bundle(response)) => read_response(&response),
            Ok(_) => return Err("a Bundle was answered without a Bundle".into()),
            Err(e) if e.is_server_error() => {
                return Err(CliError::Source(Box::new(e)))
                    .context(format!("{file} chunk {number}: the server failed (nothing of the chunk is kept)"));
            }
            Err(e) => {
                let r = Refusal::from_error(&e);
                self.report(r.line(file, number));
                self.summary.refused += entries;
                self.failed = true;
                return Ok(self.args.keep_going);
            }
        };
        let mut record = ChunkRecord { file: file.to_owned(), offset, chunk: number, ..ChunkRecord::default() };
        for (i, id) in result.created.iter().enumerate() {
            let Some(id) = id else { continue };
            let rtype = id.split('/').next().unwrap_or_default().to_owned();
            *self.summary.created.entry(rtype).or_default() += 1;
            if let Some(Some(source)) = sources.get(i) {
                record.map.insert(source.clone(), id.clone());
                self.known.insert(source.clone(), id.clone());
            }
            record.ids.push(id.clone());
        }
        self.writer.record(&record)?;
        self.done.insert((file.to_owned(), offset));
        for r in &result.refused {
            self.report(r.line(file, number));
        }
        self.summary.refused += result.refused.len();
        if !result.refused.is_empty() {
            self.failed = true;
            return Ok(self.args.keep_going);
        }
        Ok(true)
    }

    /// One NDJSON file, `--batch` lines a chunk. `false`: stop the import.
    async fn ndjson(&mut self, path: &Path, name: &str) -> Result<bool, CliError> {
        let file = std::fs::File::open(path).context(format!("cannot open {}", path.display()))?;
        let mut reader = std::io::BufReader::new(file);
        let batch = usize::try_from(self.args.batch).unwrap_or(100);
        let (mut offset, mut number) = (0u64, 0usize);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let start = offset;
            let mut lines = Vec::new();
            let mut line = String::new();
            while lines.len() < batch {
                line.clear();
                let n = reader.read_line(&mut line).context(format!("cannot read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if !line.trim().is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
            }
            if lines.is_empty() {
                return Ok(true);
            }
            let chunk = number;
            number += 1;
            self.bar.inc(offset - start);
            if self.done.contains(&(name.to_owned(), start)) {
                self.summary.skipped_chunks += 1;
                continue;
            }
            let parsed: Result<Vec<Value>, usize> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    serde_json::from_str::<Value>(l).ok().filter(|v| v.get("resourceType").is_some()).ok_or(i)
                })
                .collect();
            let resources = match parsed {
                Ok(r) => r,
                Err(i) => {
                    self.report(format!(
                        "refused: {name} chunk {chunk}, entry {i}: not a FHIR resource in JSON (the chunk is not sent)"
                    ));
                    self.summary.refused += lines.len();
                    self.failed = true;
                    if self.args.keep_going {
                        continue;
                    }
                    return Ok(false);
                }
            };
            let (bundle, sources) = resources_transaction(resources, &self.known);
            if !self.chunk(name, start, chunk, bundle, sources).await? {
                return Ok(false);
            }
        }
    }

    /// One JSON file: one chunk. `false`: stop the import.
    async fn json(&mut self, path: &Path, name: &str) -> Result<bool, CliError> {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        self.bar.inc(len);
        if self.done.contains(&(name.to_owned(), 0)) {
            self.summary.skipped_chunks += 1;
            return Ok(true);
        }
        let text = std::fs::read(path).context(format!("cannot read {}", path.display()))?;
        let bundle = match serde_json::from_slice::<Value>(&text).map_err(|_| "not JSON").and_then(bundle_for) {
            Ok(b) => b,
            Err(why) => {
                self.report(format!("refused: {name}: {why} (not sent)"));
                self.summary.refused += 1;
                self.failed = true;
                return Ok(self.args.keep_going);
            }
        };
        self.chunk(name, 0, 0, bundle, Vec::new()).await
    }
}

pub fn run(cli: &Cli, args: &ImportArgs) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    super::require_existing_data(&cfg)?;
    let files = input_files(&args.input)?;
    let state_path = args.state.clone().unwrap_or_else(|| default_state_path(&args.input));
    let previous = read_state(&state_path, args.batch)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let state =
            crate::app::AppState::open(cfg, crate::clock::system()).context("cannot open the database and keys")?;
        let caller = caller(&state, &args.account)?;
        {
            let mut conn = super::connect(&state)?;
            let p = &caller.principal;
            let target = crate::audit::Target::account(
                p.subject.clone(),
                p.username.clone().unwrap_or_default(),
                p.roles.first().copied(),
            );
            super::audit_account_change(&state, &mut conn, "records-import", target)?;
        }
        let total: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
        let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { super::progress(total, "importing") };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
        let mut run = Run {
            state: &state,
            caller,
            args,
            known: previous.map,
            done: previous.done,
            writer: StateWriter::open(&state_path, args.batch)?,
            bar,
            summary: Summary::default(),
            stop: stop.clone(),
            failed: false,
        };
        let started = Instant::now();
        for path in &files {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let name = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()).display().to_string();
            let go_on = if is_ndjson(path) { run.ndjson(path, &name).await? } else { run.json(path, &name).await? };
            if !go_on {
                break;
            }
        }
        run.bar.finish_and_clear();
        let elapsed = started.elapsed().as_secs_f64();
        let s = &run.summary;
        let created: usize = s.created.values().sum();
        let rate = if elapsed > 0.0 { created as f64 / elapsed } else { 0.0 };
        println!(
            "imported {created} resource(s) in {elapsed:.2} s ({rate:.0} resources/s) as {}; refused: {}; \
             chunks posted: {}, skipped (already imported): {}",
            args.account, s.refused, s.chunks, s.skipped_chunks
        );
        for (rtype, n) in &s.created {
            println!("  {rtype:<24} {n}");
        }
        if stop.load(Ordering::SeqCst) {
            return Err(CliError::Message(format!(
                "interrupted: rerun the same command to continue (state: {})",
                state_path.display()
            )));
        }
        if run.failed {
            let what = if s.refused == 1 { "entry" } else { "entries" };
            return Err(CliError::Message(format!("{} {what} refused (see above)", s.refused)));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_become_posts_whose_references_follow_the_new_resources() {
        let known: HashMap<String, String> = [("Patient/old".to_owned(), "Patient/new".to_owned())].into();
        let lines = vec![
            json!({"resourceType":"Encounter","id":"e1","subject":{"reference":"Patient/old"}}),
            json!({"resourceType":"Observation","id":"o1","encounter":{"reference":"Encounter/e1"},
                   "subject":{"reference":"Patient/elsewhere"}}),
        ];
        let (bundle, sources) = resources_transaction(lines, &known);
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(sources, vec![Some("Encounter/e1".to_owned()), Some("Observation/o1".to_owned())]);
        let e = &bundle["entry"];
        assert_eq!(e[0]["request"], json!({"method":"POST","url":"Encounter"}));
        assert!(e[0]["resource"].get("id").is_none(), "a POST carries no id");
        assert_eq!(e[0]["resource"]["subject"]["reference"], "Patient/new", "an earlier chunk's resource");
        let urn = e[0]["fullUrl"].as_str().unwrap();
        assert!(urn.starts_with("urn:uuid:"));
        assert_eq!(e[1]["resource"]["encounter"]["reference"], urn, "the same chunk's resource, by its fullUrl");
        assert_eq!(e[1]["resource"]["subject"]["reference"], "Patient/elsewhere", "unknown references stay");
    }

    #[test]
    fn bundles_are_posted_as_they_are_or_converted_to_transactions() {
        let tx = json!({"resourceType":"Bundle","type":"batch","entry":[]});
        assert_eq!(bundle_for(tx.clone()).unwrap(), tx);
        let collection = json!({"resourceType":"Bundle","type":"collection","entry":[
            {"fullUrl":"urn:uuid:11111111-1111-4111-8111-111111111111","resource":{"resourceType":"Patient"}},
            {"fullUrl":"https://x.test/fhir/Practitioner/p9","resource":{"resourceType":"Practitioner","id":"p9"}},
            {"resource":{"resourceType":"Encounter","subject":{"reference":"urn:uuid:11111111-1111-4111-8111-111111111111"},
                         "participant":[{"individual":{"reference":"Practitioner/p9"}}]}},
            {"search":{"mode":"outcome"},"resource":{"resourceType":"OperationOutcome"}}]});
        let b = bundle_for(collection).unwrap();
        assert_eq!(b["type"], "transaction");
        let e = b["entry"].as_array().unwrap();
        assert_eq!(e.len(), 3, "the search outcome is not a record");
        assert_eq!(e[0]["fullUrl"], "urn:uuid:11111111-1111-4111-8111-111111111111", "urn:uuid fullUrls kept");
        assert_eq!(e[2]["resource"]["subject"]["reference"], "urn:uuid:11111111-1111-4111-8111-111111111111");
        let p = e[1]["fullUrl"].as_str().unwrap();
        assert!(p.starts_with("urn:uuid:"));
        assert_eq!(e[2]["resource"]["participant"][0]["individual"]["reference"], p);
        assert!(e.iter().all(|x| x["request"]["method"] == "POST"));
        let one = bundle_for(json!({"resourceType":"Patient","id":"x"})).unwrap();
        assert_eq!(one["entry"].as_array().unwrap().len(), 1);
        assert!(bundle_for(json!({"resourceType":"Bundle","type":"document"})).is_err());
        assert!(bundle_for(json!({"x":1})).is_err());
    }

    #[test]
    fn responses_give_the_created_ids_and_the_refusals_without_values() {
        let response = json!({"resourceType":"Bundle","type":"batch-response","entry":[
            {"response":{"status":"201 Created","location":"Patient/abc/_history/1"}},
            {"response":{"status":"403 Forbidden","outcome":{"resourceType":"OperationOutcome","issue":[
                {"severity":"error","code":"forbidden","diagnostics":"The operation is not permitted.",
                 "expression":["Patient.identifier"]}]}}}]});
        let r = read_response(&response);
        assert_eq!(r.created, vec![Some("Patient/abc".to_owned()), None]);
        assert_eq!(
            r.refused,
            vec![Refusal {
                entry: Some(1),
                status: 403,
                code: "forbidden".into(),
                diagnostics: "The operation is not permitted.".into(),
                expression: Some("Patient.identifier".into()),
            }]
        );
        assert_eq!(
            r.refused[0].line("f.ndjson", 2),
            "refused: f.ndjson chunk 2, entry 1: 403 forbidden: The operation is not permitted. (at Patient.identifier)"
        );
    }

    #[test]
    fn the_state_file_is_resumed_and_a_torn_last_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.ndjson.import-state");
        assert!(read_state(&path, 10).unwrap().done.is_empty(), "no file: nothing done");
        let mut w = StateWriter::open(&path, 10).unwrap();
        let rec = ChunkRecord {
            file: "/d/in.ndjson".into(),
            offset: 0,
            chunk: 0,
            ids: vec!["Patient/n1".into()],
            map: [("Patient/p1".to_owned(), "Patient/n1".to_owned())].into(),
        };
        w.record(&rec).unwrap();
        drop(w);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"file\":\"/d/in.nd").unwrap();
        drop(f);
        let s = read_state(&path, 10).unwrap();
        assert_eq!(s.records, vec![rec.clone()]);
        assert!(s.done.contains(&("/d/in.ndjson".to_owned(), 0)));
        assert_eq!(s.map.get("Patient/p1").map(String::as_str), Some("Patient/n1"));
        let line = super::super::report(&read_state(&path, 20).unwrap_err());
        assert!(line.contains("--batch 10"), "{line}");
        // Reopened after the torn line: the next record starts on its own line and the file reads back whole.
        let mut w = StateWriter::open(&path, 10).unwrap();
        let rec2 = ChunkRecord { offset: 99, chunk: 1, ..rec.clone() };
        w.record(&rec2).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "the torn line is cut off: {text}");
        assert_eq!(read_state(&path, 10).unwrap().records, vec![rec, rec2]);
        std::fs::write(&path, format!("{}\n{{not json\n{}\n", text.lines().next().unwrap(), "{}")).unwrap();
        let err = super::super::report(&read_state(&path, 10).unwrap_err());
        assert!(err.contains("unreadable line 2"), "an unreadable line that is not the last is refused: {err}");
    }
}
