//! Real `redis-server` processes on free loopback ports, stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that is free now (and, for cluster nodes, whose bus port +10000 is free too).
fn free_port(with_bus: bool) -> u16 {
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

fn scratch_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ttr-redis-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What every server here runs with: loopback only, nothing saved, its own directory.
fn base_args(port: &str, dir: &std::path::Path) -> Vec<String> {
    [
        "--port",
        port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        // DEBUG SLEEP makes Redis slow on purpose in tests.
        "--enable-debug-command",
        "local",
        "--dir",
    ]
    .map(String::from)
    .into_iter()
    .chain([dir.to_str().unwrap().to_owned()])
    .collect()
}

/// Sends one inline command and returns the first reply line.
fn command(port: u16, password: Option<&str>, cmd: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut out = String::new();
    if let Some(pw) = password {
        out.push_str(&format!("AUTH {pw}\r\n"));
    }
    out.push_str(cmd);
    out.push_str("\r\n");
    s.write_all(out.as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    let want = if password.is_some() { 2 } else { 1 };
    while got.matches("\r\n").count() < want {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got.lines().nth(want - 1).map(str::to_owned)
}

/// One `redis-server`.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    password: Option<String>,
    /// Serves TLS only (a self-signed certificate).
    tls: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server.
    pub fn start() -> Self {
        Self::start_with(&[], None)
    }

    /// A standalone server that fsyncs every write to its append-only file, so a SIGKILL loses
    /// nothing it acknowledged and a restart (same directory) brings every counter back.
    pub fn start_persistent() -> Self {
        let mut s = Self::start_with(&[], None);
        s.kill();
        for (flag, value) in [("--appendonly", "yes"), ("--appendfsync", "always")] {
            let i = s.args.iter().position(|a| a == flag);
            match i {
                Some(i) => s.args[i + 1] = value.into(),
                None => s.args.extend([flag.to_string(), value.to_string()]),
            }
        }
        s.restart();
        s
    }

    /// A standalone server that requires this password.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(&["--requirepass", password], Some(password))
    }

    fn start_with(extra: &[&str], password: Option<&str>) -> Self {
        let dir = scratch_dir();
        Self::launch(false, password, false, |port| {
            let mut args = base_args(&port.to_string(), &dir);
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        })
    }

    fn cluster_node(dir: &std::path::Path, node_timeout_ms: u32) -> Self {
        Self::launch(true, None, false, |port| {
            let conf = dir.join(format!("nodes-{port}.conf"));
            let mut args = base_args(&port.to_string(), dir);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--cluster-node-timeout",
                    &node_timeout_ms.to_string(),
                ]
                .map(String::from),
            );
            args
        })
    }

    /// A server that speaks only TLS, with a self-signed certificate made by `openssl`.
    pub fn start_tls() -> Self {
        let dir = scratch_dir();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl on PATH");
        assert!(made.success(), "openssl could not make a certificate");
        Self::launch(false, None, true, |port| {
            let mut args = base_args("0", &dir);
            args.extend(
                [
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    cert.to_str().unwrap(),
                    "--tls-key-file",
                    key.to_str().unwrap(),
                    "--tls-ca-cert-file",
                    cert.to_str().unwrap(),
                    "--tls-auth-clients",
                    "no",
                ]
                .map(String::from),
            );
            args
        })
    }

    /// Starts a server on a free port (with the cluster bus port above it free too if
    /// `with_bus`), its arguments made by `args` for the port. A port another process takes
    /// between being found free and the server binding it makes the server exit: then it is
    /// tried again on another.
    fn launch(
        with_bus: bool,
        password: Option<&str>,
        tls: bool,
        args: impl Fn(u16) -> Vec<String>,
    ) -> Self {
        for _ in 0..5 {
            let port = free_port(with_bus);
            let mut server = RedisServer {
                port,
                args: args(port),
                password: password.map(str::to_owned),
                tls,
                child: None,
            };
            if server.try_restart() {
                return server;
            }
            eprintln!("redis-server on {port} exited at start (port taken?); trying another");
        }
        panic!("redis-server exited at start on 5 ports in turn");
    }

    fn answers(&self) -> bool {
        if !self.tls {
            return command(self.port, self.password.as_deref(), "PING").as_deref()
                == Some("+PONG");
        }
        Command::new("redis-cli")
            .args(["--tls", "--insecure", "-p", &self.port.to_string(), "PING"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// Starts (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(
            self.try_restart(),
            "redis-server on {} exited at start (port taken?)",
            self.port
        );
    }

    /// [`restart`](Self::restart), false if the server exits before it answers (or answers
    /// while exiting: then another process answered on its port).
    fn try_restart(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = self.answers();
            let child = self.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if answered {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Clears `INFO commandstats` (`CONFIG RESETSTAT`), to count the commands that follow.
    pub fn reset_stats(&self) {
        deadpool_redis::redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut self.client())
            .unwrap();
    }

    /// Keeps Redis busy for `seconds` (`DEBUG SLEEP`, from another thread): commands sent
    /// meanwhile wait. Join the handle to wait for the end.
    pub fn busy_for(&self, seconds: f64) -> std::thread::JoinHandle<()> {
        let mut con = self.client();
        std::thread::spawn(move || {
            deadpool_redis::redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query::<()>(&mut con)
                .unwrap();
        })
    }

    /// A synchronous client connection for assertions.
    pub fn client(&self) -> deadpool_redis::redis::Connection {
        let url = match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        deadpool_redis::redis::Client::open(url)
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

/// Calls of each command since the last `CONFIG RESETSTAT`, from `INFO commandstats`,
/// including those scripts run inside.
pub fn command_calls(server: &RedisServer) -> Vec<(String, u64)> {
    let mut con = server.client();
    let info: String = deadpool_redis::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .map(|line| {
            let name = line.split(':').next().unwrap_or("");
            let calls = line
                .split("calls=")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (name.to_owned(), calls)
        })
        .collect()
}

/// Commands clients sent since the last `CONFIG RESETSTAT`: `(evalsha, all)`. Redis also
/// counts the commands scripts run inside (GET, INCRBY, TIME, ...); those are not round trips
/// and are left out, as are INFO and CONFIG themselves.
pub fn client_commands(server: &RedisServer) -> (u64, u64) {
    let in_scripts = [
        "get",
        "pttl",
        "incrby",
        "decrby",
        "ttl",
        "expire",
        "pexpire",
        "pexpiretime",
        "time",
        "hmget",
        "hset",
        "info",
        "config",
    ];
    let (mut evalsha, mut total) = (0, 0);
    for (name, calls) in command_calls(server) {
        // `config|resetstat` is CONFIG.
        if in_scripts.contains(&name.split('|').next().unwrap_or("")) {
            continue;
        }
        total += calls;
        if name == "evalsha" {
            evalsha += calls;
        }
    }
    (evalsha, total)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-master Redis Cluster, with replicas if asked for.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub fn start() -> Self {
        Self::start_with(0, 2000)
    }

    /// Three masters with `replicas` replicas each; a master unreachable for `node_timeout_ms`
    /// is failed over to one of its replicas.
    pub fn start_with(replicas: usize, node_timeout_ms: u32) -> Self {
        // `redis-cli --cluster create` failed once in a CI run with nothing on its stdout; its
        // stderr is shown now, and the cluster is made again on fresh nodes (twice at most).
        for attempt in 1.. {
            let dir = scratch_dir();
            let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
                .map(|_| RedisServer::cluster_node(&dir, node_timeout_ms))
                .collect();
            let addrs: Vec<String> = nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port))
                .collect();
            let out = Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addrs)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                .output()
                .expect("redis-cli on PATH (.ci/run installs it)");
            let cluster = RedisCluster { nodes, dir };
            if out.status.success() {
                return cluster.await_ready(replicas);
            }
            let failure = format!(
                "cluster create on {addrs:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(attempt < 3, "{failure}");
            eprintln!("{failure}; making it again");
        }
        unreachable!()
    }

    /// Waits until the cluster just made is whole and its replicas are in sync.
    fn await_ready(self, replicas: usize) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..self.nodes.len() {
            // Every node agrees, each master's replicas have joined it, and a replica has its
            // master's data (its first sync can wait seconds: until then a failover would
            // promote it empty).
            while !self.node_ok(i) || self.replicas_known(i) < 3 * replicas || !self.synced(i) {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self
    }

    /// What `redis-cli` prints for `args` sent to node `i` (nothing from a dead node).
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[i].port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `CLUSTER NODES` as node `i` sees it: one line per node.
    fn cluster_nodes(&self, i: usize) -> String {
        self.cli(i, &["cluster", "nodes"])
    }

    /// For a failing test's message: `key`'s value on every node (a dead node answers
    /// nothing), and the cluster as node `seen_by` sees it.
    pub fn describe(&self, key: &str, seen_by: usize) -> String {
        let values: Vec<String> = (0..self.nodes.len())
            .map(|i| {
                let value = self.cli(i, &["get", key]);
                format!("{}: {:?}", self.nodes[i].port, value.trim())
            })
            .collect();
        format!(
            "{key} per node: {}\ncluster nodes seen by node {seen_by}:\n{}",
            values.join(", "),
            self.cluster_nodes(seen_by)
        )
    }

    /// Whether node `i` reports `cluster_state:ok`.
    pub fn node_ok(&self, i: usize) -> bool {
        self.cli(i, &["cluster", "info"])
            .contains("cluster_state:ok")
    }

    /// Whether node `i` is a master, or a replica whose link to its master is up.
    fn synced(&self, i: usize) -> bool {
        let info = self.cli(i, &["info", "replication"]);
        info.contains("role:master") || info.contains("master_link_status:up")
    }

    fn replicas_known(&self, i: usize) -> usize {
        self.cluster_nodes(i)
            .lines()
            .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("slave")))
            .count()
    }

    /// The node that node `seen_by` names as the master serving `key`'s slot, if any.
    pub fn master_of(&self, key: &str, seen_by: usize) -> Option<usize> {
        let slot: u16 = self
            .cli(seen_by, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        // `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <state> <slots>...`
        let nodes = self.cluster_nodes(seen_by);
        let line = nodes.lines().find(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            fields.len() > 8
                && fields[2].contains("master")
                && !fields[2].contains("fail")
                && fields[8..].iter().any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
                })
        })?;
        let port: u16 = line
            .split(' ')
            .nth(1)?
            .split(['@', ':'])
            .nth(1)?
            .parse()
            .ok()?;
        self.nodes.iter().position(|n| n.port == port)
    }

    pub fn node_addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// A synchronous cluster client connection for assertions.
    pub fn client(&self) -> deadpool_redis::redis::cluster::ClusterConnection {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        deadpool_redis::redis::cluster::ClusterClient::new(urls)
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
