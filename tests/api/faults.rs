//! Faults on the real binary (issue 18 part 6): SIGKILL under a mixed write load, PostgreSQL restarted under
//! load (a private PostgreSQL instance, never the machine's shared one), and a full disk under the SQLite file.
//! Each checks that every acknowledged write and its audit event are there afterwards and that `audit verify`
//! passes. Figures (`FIGURE …` lines, `--nocapture`) are quoted in docs/security-testing.md.

use crate::helpers::PgDatabase;
use crate::process::{DataDir, Served, require};
use carevault::store::schema::audit_events;
use diesel::prelude::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server acknowledged for one Patient, in order.
#[derive(Debug, Clone, Default)]
struct Acked {
    created: bool,
    /// The family name of the newest acknowledged version.
    family: String,
    updated: bool,
    deleted: bool,
    /// A delete was sent but not answered (the kill came first): either outcome is right.
    delete_in_flight: bool,
}

type Ledger = Arc<Mutex<HashMap<String, Acked>>>;

fn patient(family: &str) -> String {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Fault"]}], "gender": "other"}).to_string()
}

/// Every status a request got, with how long it took (0 = no answer: the connection failed).
#[derive(Debug, Default)]
struct Statuses {
    seen: Vec<(u16, Duration, Instant)>,
}

/// One writer: create a Patient, update it (If-Match), and delete every third one, until `stop` or a failed
/// connection (when `stop_on_error`). Every answered request is logged in `statuses`.
#[allow(clippy::too_many_arguments)]
async fn writer(
    client: reqwest::Client,
    base: Arc<Mutex<String>>,
    token: String,
    w: usize,
    ledger: Ledger,
    statuses: Arc<Mutex<Statuses>>,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    stop_on_error: bool,
) {
    let send = |req: reqwest::RequestBuilder| {
        let statuses = statuses.clone();
        async move {
            let began = Instant::now();
            let r = req.timeout(Duration::from_secs(40)).send().await;
            let status = r.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            statuses.lock().unwrap().seen.push((status, began.elapsed(), began));
            match r {
                Ok(r) => r.bytes().await.ok().map(|b| (status, b)),
                Err(_) => None,
            }
        }
    };
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let base_now = base.lock().unwrap().clone();
        let family = format!("Fault{w}x{i}");
        let created = send(
            client
                .post(format!("{base_now}/fhir/Patient"))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .body(patient(&family)),
        )
        .await;
        let id = match created {
            Some((201, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap();
                let id = v["id"].as_str().unwrap().to_owned();
                ledger
                    .lock()
                    .unwrap()
                    .insert(id.clone(), Acked { created: true, family: family.clone(), ..Default::default() });
                acks.fetch_add(1, Ordering::SeqCst);
                id
            }
            None if stop_on_error => return,
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let family2 = format!("{family}u");
        let mut body: Value = serde_json::from_str(&patient(&family2)).unwrap();
        body["id"] = json!(id);
        let updated = send(
            client
                .put(format!("{base_now}/fhir/Patient/{id}"))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .header("if-match", "W/\"1\"")
                .body(body.to_string()),
        )
        .await;
        match updated {
            Some((200, _)) => {
                let mut l = ledger.lock().unwrap();
                let a = l.get_mut(&id).unwrap();
                a.updated = true;
                a.family = family2;
                acks.fetch_add(1, Ordering::SeqCst);
            }
            None if stop_on_error => {
                // Unanswered: the update may or may not have committed; the ledger keeps the created version,
                // so only "at least version 1" is checked for this one.
                ledger.lock().unwrap().get_mut(&id).unwrap().family.clear();
                return;
            }
            _ => continue,
        }
        if i % 3 == 0 {
            ledger.lock().unwrap().get_mut(&id).unwrap().delete_in_flight = true;
            let deleted = send(client.delete(format!("{base_now}/fhir/Patient/{id}")).bearer_auth(&token)).await;
            match deleted {
                Some((204, _)) => {
                    let mut l = ledger.lock().unwrap();
                    let a = l.get_mut(&id).unwrap();
                    a.deleted = true;
                    a.delete_in_flight = false;
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                None if stop_on_error => return,
                _ => {}
            }
        }
    }
}

/// (kind, resource id) of every audit event.
fn audit_pairs(target: &carevault::config::DatabaseTarget) -> HashSet<(String, String)> {
    let db = carevault::store::Db::connect(target, 1).unwrap();
    let mut conn = db.conn().unwrap();
    let rows: Vec<(String, String)> =
        audit_events::table.select((audit_events::kind, audit_events::body)).load(&mut conn).unwrap();
    rows.into_iter()
        .filter_map(|(k, b)| {
            serde_json::from_str::<Value>(&b).unwrap()["resource_id"].as_str().map(|id| (k, id.to_owned()))
        })
        .collect()
}

/// Every acknowledged write is readable as acknowledged and has its audit event. Returns the writes checked.
async fn check_ledger(
    server: &Served,
    client: &reqwest::Client,
    token: &str,
    ledger: &HashMap<String, Acked>,
    target: &carevault::config::DatabaseTarget,
) -> usize {
    let events = audit_pairs(target);
    let mut writes = 0;
    for (id, a) in ledger {
        let r = client.get(server.url(&format!("/fhir/Patient/{id}"))).bearer_auth(token).send().await.unwrap();
        let status = r.status().as_u16();
        if a.deleted {
            assert_eq!(status, 410, "the delete of {id} was answered 204 but the Patient is back");
        } else if a.delete_in_flight {
            assert!(status == 200 || status == 410, "{id}: {status}");
        } else {
            assert_eq!(status, 200, "the create of {id} was answered 201 but it is gone");
            let v: Value = r.json().await.unwrap();
            if !a.family.is_empty() {
                assert_eq!(v["name"][0]["family"], json!(a.family), "{id}: an acknowledged version was lost");
            }
        }
        for (kind, done) in [("create", a.created), ("update", a.updated), ("delete", a.deleted)] {
            if done {
                writes += 1;
                assert!(
                    events.contains(&(kind.to_owned(), id.clone())),
                    "{kind} of {id} was acknowledged but not audited"
                );
            }
        }
    }
    writes
}

fn sqlite_target(path: &Path) -> carevault::config::DatabaseTarget {
    carevault::config::DatabaseTarget::Sqlite(path.to_path_buf())
}

/// SIGKILL of the server while 6 writers create, update and delete Patients; restarted on the same data: every
/// acknowledged write is there as acknowledged, each with its audit event, and `audit verify` passes.
async fn sigkill_under_mixed_write_load(database_url: String, target: carevault::config::DatabaseTarget) {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::new(tmp.path(), &database_url, "");
    let mut server = data.serve();
    data.add_user("desk", "front_desk", None);
    let client = data.client();
    let token = server.login(&client, "desk").await;
    let ledger: Ledger = Arc::default();
    let statuses = Arc::new(Mutex::new(Statuses::default()));
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let base = Arc::new(Mutex::new(server.base.clone()));
    let mut workers = Vec::new();
    for w in 0..6 {
        workers.push(tokio::spawn(writer(
            client.clone(),
            base.clone(),
            token.clone(),
            w,
            ledger.clone(),
            statuses.clone(),
            acks.clone(),
            stop.clone(),
            true,
        )));
    }
    let started = Instant::now();
    while acks.load(Ordering::SeqCst) < 90 {
        assert!(started.elapsed() < Duration::from_secs(120), "the load did not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    for w in workers {
        w.await.unwrap();
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let bad: Vec<u16> = statuses.lock().unwrap().seen.iter().map(|s| s.0).filter(|s| *s >= 500).collect();
    assert!(bad.is_empty(), "answers before the kill: {bad:?}");

    let server = data.serve();
    let token = server.login(&client, "desk").await;
    let writes = check_ledger(&server, &client, &token, &ledger, &target).await;
    drop(server);
    let (ok, text) = data.audit_verify();
    assert!(ok, "audit verify after SIGKILL: {text}");
    eprintln!(
        "FIGURE sigkill: {writes} acknowledged writes over {} patients, all present and audited after restart; audit verify: ok",
        ledger.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mixed_write_load_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("cv.db");
    sigkill_under_mixed_write_load(format!("sqlite://{}", db.display()), sqlite_target(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mixed_write_load_postgres() {
    let Some(pg) = PgDatabase::create() else { return };
    let target = carevault::config::parse_database_url(&pg.url).unwrap();
    sigkill_under_mixed_write_load(pg.url.clone(), target).await;
}

// ---------------------------------------------------------------------------------------------------------------
// PostgreSQL restarted under load.

/// How long PostgreSQL stays down.
const OUTAGE_SECS: u64 = 8;

/// A private PostgreSQL cluster (initdb + pg_ctl) on its own port and directory, stopped when dropped.
struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
    as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("CAREVAULT_TEST_PG_BIN") {
        return Some(PathBuf::from(b));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivatePg {
    fn start() -> Option<PrivatePg> {
        let bin = pg_bin();
        if !require("PostgreSQL server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin)", bin.is_some()) {
            return None;
        }
        let bin = bin.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pg");
        std::fs::create_dir(&data).unwrap();
        // initdb refuses to run as root: as root, the cluster belongs to the `postgres` user.
        let as_postgres = is_root();
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            assert!(Command::new("chown").args(["postgres:postgres"]).arg(&data).status().unwrap().success());
        }
        let pg = PrivatePg { bin, data, port: crate::helpers::free_port(), _dir: dir, as_postgres };
        let out =
            pg.run("initdb", &["-D", &pg.data.display().to_string(), "-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        pg.ctl_start();
        Some(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        c.args(args).current_dir("/");
        tokio::task::block_in_place(|| c.output().unwrap())
    }

    fn ctl_start(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on", self.port, self.data.display());
        let log = self.data.join("server.log").display().to_string();
        let out = self.run(
            "pg_ctl",
            &["-D", &self.data.display().to_string(), "-l", &log, "-o", &opts, "-w", "-t", "60", "start"],
        );
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn ctl_stop(&self, mode: &str) {
        let out = self.run("pg_ctl", &["-D", &self.data.display().to_string(), "-m", mode, "-w", "-t", "60", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data.display().to_string(), "-m", "immediate", "-w", "stop"]);
    }
}

/// PostgreSQL (a private instance) stopped for 5 s under 4 writers and started again: requests during the
/// outage are answered 503 in bounded time (never 500, never a hang), the same server process serves again
/// afterwards, and no acknowledged write or audit event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_is_503_then_recovers() {
    let Some(pg) = PrivatePg::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::new(tmp.path(), &pg.url(), "");
    let server = data.serve();
    data.add_user("desk", "front_desk", None);
    let client = data.client();
    let token = server.login(&client, "desk").await;
    let ledger: Ledger = Arc::default();
    let statuses = Arc::new(Mutex::new(Statuses::default()));
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let base = Arc::new(Mutex::new(server.base.clone()));
    let mut workers = Vec::new();
    for w in 0..4 {
        workers.push(tokio::spawn(writer(
            client.clone(),
            base.clone(),
            token.clone(),
            w,
            ledger.clone(),
            statuses.clone(),
            acks.clone(),
            stop.clone(),
            false,
        )));
    }
    let wait_acks = |n: usize| {
        let acks = acks.clone();
        async move {
            let started = Instant::now();
            while acks.load(Ordering::SeqCst) < n {
                assert!(started.elapsed() < Duration::from_secs(120), "the load did not progress");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_acks(40).await;
    // A fast shutdown ends every backend (the pooled connections die) and refuses new connections.
    let down_at = Instant::now();
    pg.ctl_stop("fast");
    tokio::time::sleep(Duration::from_secs(OUTAGE_SECS)).await;
    pg.ctl_start();
    let up_at = Instant::now();
    let acked_at_restart = acks.load(Ordering::SeqCst);
    // Recovery: writes acknowledged again without restarting the server.
    let started = Instant::now();
    while acks.load(Ordering::SeqCst) < acked_at_restart + 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no write acknowledged within 60 s of PostgreSQL's restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered_after = up_at.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    assert!(server.child.id() > 0);
    let seen = std::mem::take(&mut statuses.lock().unwrap().seen);
    let during: Vec<&(u16, Duration, Instant)> =
        seen.iter().filter(|(_, _, at)| *at >= down_at && *at < up_at).collect();
    let count = |code: u16| seen.iter().filter(|s| s.0 == code).count();
    let slowest = seen.iter().map(|s| s.1).max().unwrap_or_default();
    let mut histogram: Vec<(u16, usize)> = Vec::new();
    for s in &seen {
        match histogram.iter_mut().find(|(c, _)| *c == s.0) {
            Some((_, n)) => *n += 1,
            None => histogram.push((s.0, 1)),
        }
    }
    histogram.sort_unstable();
    assert_eq!(count(500), 0, "500 during the outage: {histogram:?}");
    assert_eq!(count(0), 0, "requests without an answer (connection failed or timed out): {histogram:?}");
    assert!(during.iter().any(|s| s.0 == 503), "no 503 while PostgreSQL was down: {histogram:?}");
    assert!(seen.iter().all(|s| matches!(s.0, 200 | 201 | 204 | 503)), "only 2xx and 503 expected: {histogram:?}");
    // Before the fix a request during the outage waited for the pool's whole timeout, once per checkout: 16 s.
    assert!(slowest < Duration::from_secs(4), "a request took {slowest:?} (held while PostgreSQL was down)");
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let writes =
        check_ledger(&server, &client, &token, &ledger, &carevault::config::parse_database_url(&pg.url()).unwrap())
            .await;
    drop(server);
    let (ok, text) = data.audit_verify();
    assert!(ok, "audit verify after the PostgreSQL restart: {text}");
    eprintln!(
        "FIGURE postgres-restart: {} requests ({histogram:?}), {} during the {OUTAGE_SECS} s outage, slowest answer {slowest:?}, \
         writes acknowledged again {recovered_after:?} after PostgreSQL was back; {writes} acknowledged writes all \
         present and audited; audit verify: ok",
        seen.len(),
        during.len()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// A full disk under the SQLite file.

/// A small tmpfs mounted for the test (root only), unmounted when dropped.
struct SmallVolume {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallVolume {
    fn mount(size: &str) -> Option<SmallVolume> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::create_dir(&path).unwrap();
        let mounted = is_root()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
                .arg(&path)
                .status()
                .is_ok_and(|s| s.success());
        if !require("a tmpfs mount (root) for the disk-full test", mounted) {
            return None;
        }
        Some(SmallVolume { path, _dir: dir })
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Fills the volume with `filler` until the file system refuses more bytes.
fn fill(filler: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// The SQLite file on an 8 MiB volume that then fills up: writes (and reads, whose audit event cannot be
/// written) are refused with 503 and a generic OperationOutcome that echoes nothing, the server stays up, and
/// once space is freed it writes again; afterwards `PRAGMA integrity_check` is ok, every acknowledged write is
/// there and audited, and `audit verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_sqlite_is_a_clear_refusal_and_nothing_is_corrupted() {
    let Some(vol) = SmallVolume::mount("8m") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = vol.path.join("carevault.db");
    let data = DataDir::new(tmp.path(), &format!("sqlite://{}", db.display()), "");
    let server = data.serve();
    data.add_user("desk", "front_desk", None);
    let client = data.client();
    let token = server.login(&client, "desk").await;
    const CANARY: &str = "DISKFULLCANARY";
    let create = |family: String| {
        let (client, token, url) = (client.clone(), token.clone(), server.url("/fhir/Patient"));
        async move {
            let r = client
                .post(url)
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .body(patient(&family))
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let headers = format!("{:?}", r.headers());
            let body = r.text().await.unwrap();
            (status, headers, body)
        }
    };
    let mut ledger: HashMap<String, Acked> = HashMap::new();
    for i in 0..20 {
        let (status, _, body) = create(format!("Before{i}")).await;
        assert_eq!(status, 201, "{body}");
        let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
        ledger.insert(id, Acked { created: true, family: format!("Before{i}"), ..Default::default() });
    }
    let filler = vol.path.join("filler");
    let filled = fill(&filler);
    // The WAL may still have room for a few pages: write until refused, then ten more.
    let (mut refused, mut tried) = (0, 0);
    for i in 0..300 {
        if refused >= 10 {
            break;
        }
        tried += 1;
        let (status, headers, body) = create(format!("{CANARY}{i}")).await;
        match status {
            201 => {
                let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
                ledger.insert(id, Acked { created: true, family: format!("{CANARY}{i}"), ..Default::default() });
            }
            503 | 507 => {
                refused += 1;
                let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
                assert_eq!(v["resourceType"], "OperationOutcome", "{body}");
                assert!(!body.contains(CANARY) && !headers.contains(CANARY), "echoed: {body}");
            }
            other => panic!("a write on a full disk answered {other}: {body}"),
        }
    }
    assert!(refused >= 10, "only {refused} of {tried} writes refused on a full disk");
    let some_id = ledger.keys().next().unwrap().clone();
    let read = client.get(server.url(&format!("/fhir/Patient/{some_id}"))).bearer_auth(&token).send().await.unwrap();
    let read_status = read.status().as_u16();
    assert!(matches!(read_status, 200 | 503), "a read on a full disk answered {read_status}");
    let health = client.get(server.url("/health/live")).send().await.unwrap().status();
    assert_eq!(health, 200, "the server must stay up");

    std::fs::remove_file(&filler).unwrap();
    let mut after = 0;
    for i in 0..10 {
        let (status, _, body) = create(format!("After{i}")).await;
        assert_eq!(status, 201, "a write after space was freed: {body}");
        let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
        ledger.insert(id, Acked { created: true, family: format!("After{i}"), ..Default::default() });
        after += 1;
    }
    let writes = check_ledger(&server, &client, &token, &ledger, &sqlite_target(&db)).await;
    let output = server.output();
    drop(server);
    assert!(!output.iter().any(|l| l.contains(CANARY)), "a log line carries a submitted value");
    let integrity: Vec<String> = {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            integrity_check: String,
        }
        let mut conn = diesel::SqliteConnection::establish(&db.display().to_string()).unwrap();
        diesel::sql_query("PRAGMA integrity_check")
            .load::<Row>(&mut conn)
            .unwrap()
            .into_iter()
            .map(|r| r.integrity_check)
            .collect()
    };
    assert_eq!(integrity, vec!["ok".to_owned()]);
    let (ok, text) = data.audit_verify();
    assert!(ok, "audit verify after the disk was full: {text}");
    eprintln!(
        "FIGURE disk-full: {filled} filler bytes; {refused} of {tried} writes refused 503 with a generic \
         OperationOutcome, a read answered {read_status}; {after} writes accepted after freeing space; \
         {writes} acknowledged writes present and audited; integrity_check ok; audit verify: ok"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// SIGKILL during a large transaction Bundle.

/// The Patients and their create events in the database.
fn patients_and_creates(target: &carevault::config::DatabaseTarget) -> (usize, usize) {
    use carevault::store::schema::resources;
    let db = carevault::store::Db::connect(target, 1).unwrap();
    let mut conn = db.conn().unwrap();
    let patients: i64 =
        resources::table.filter(resources::resource_type.eq("Patient")).count().get_result(&mut conn).unwrap();
    let creates = audit_pairs(target).iter().filter(|(k, _)| k == "create").count();
    (usize::try_from(patients).unwrap(), creates)
}

fn big_transaction(n: usize, family: &str) -> Value {
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                   "request": {"method": "POST", "url": "Patient"},
                   "resource": {"resourceType": "Patient", "name": [{"family": family, "given": [format!("N{i}")]}],
                                "identifier": [{"system": "urn:mrn", "value": format!("{family}-{i}")}]}})
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// SIGKILL half way through a transaction of `n` Patients (its duration measured by a first, completed one):
/// after restart the second transaction is there whole or not at all, with exactly one create event per stored
/// Patient, and `audit verify` passes.
async fn sigkill_during_a_transaction(database_url: String, target: carevault::config::DatabaseTarget) {
    const N: usize = 1500;
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::new(tmp.path(), &database_url, "");
    let mut server = data.serve();
    data.add_user("desk", "front_desk", None);
    let client = data.client();
    let token = server.login(&client, "desk").await;
    let post = |body: Value, base: String, token: String, client: reqwest::Client| async move {
        client
            .post(format!("{base}/fhir"))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
    };
    let started = Instant::now();
    let first = post(big_transaction(N, "First"), server.base.clone(), token.clone(), client.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    let took = started.elapsed();
    assert_eq!(patients_and_creates(&target), (N, N));
    let second = tokio::spawn(post(big_transaction(N, "Second"), server.base.clone(), token.clone(), client.clone()));
    tokio::time::sleep(took / 2).await;
    server.kill9();
    let answered = second.await.unwrap().is_ok_and(|r| r.status() == 200);

    let server = data.serve();
    let (patients, creates) = patients_and_creates(&target);
    drop(server);
    assert!(patients == N || patients == 2 * N, "a partial transaction survived: {patients} Patients");
    if answered {
        assert_eq!(patients, 2 * N, "an answered transaction was lost");
    }
    assert_eq!(creates, patients, "every stored Patient has its create event, and no other");
    let (ok, text) = data.audit_verify();
    assert!(ok, "audit verify after SIGKILL: {text}");
    eprintln!(
        "FIGURE sigkill-transaction: {N} entries ({} ms when completed), killed at half: {} after restart",
        took.as_millis(),
        if patients == N { "nothing of it" } else { "all of it" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_transaction_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("cv.db");
    sigkill_during_a_transaction(format!("sqlite://{}", db.display()), sqlite_target(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_transaction_postgres() {
    let Some(pg) = PgDatabase::create() else { return };
    let target = carevault::config::parse_database_url(&pg.url).unwrap();
    sigkill_during_a_transaction(pg.url.clone(), target).await;
}
