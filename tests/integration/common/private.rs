//! Dependencies a test owns and may break: a RabbitMQ node and a Redis of its own on free ports,
//! and the means to cut connections and wait for processes. The machine's shared services are
//! never stopped.

use std::time::{Duration, Instant};

use super::unique;

/// Sends `signal` (`libc::SIGTERM`, `libc::SIGKILL`, …) to process `pid`, as an operator or the
/// kernel would, and asserts it was delivered.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        sent,
        0,
        "signal {signal} to {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A RabbitMQ node of the test's own, on its own port, that the test may stop and start: the
/// machine's shared broker is never touched.
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRabbit {
    pub fn start() -> Self {
        let port = free_port();
        let dist_port = free_port();
        let node = format!("{}@localhost", unique("kobetest").replace('-', "_"));
        let dir = std::env::temp_dir().join(unique("kobetest-rabbit"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The machine's rabbitmq.conf pins the listener to 5672: this node gets its own file.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown of {dir:?} failed");
        let rabbit = Self { node, port, dir };
        rabbit.launch(dist_port);
        rabbit
    }

    fn launch(&self, dist_port: u16) {
        let d = &self.dir;
        let status = std::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d.join("feature_flags"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .status()
            .expect("rabbitmq-server");
        assert!(status.success());
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "private RabbitMQ {} did not start; see {:?}",
                self.node,
                d.join("log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn stop(&self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .output();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "private RabbitMQ did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the node with SIGKILL, as a crash or the OOM killer would: no goodbye to its
    /// clients, whose sockets the kernel closes.
    /// Sets the node's memory high watermark: on (0) raises the memory alarm, which blocks every
    /// publisher while consumers go on.
    pub fn memory_alarm(&self, on: bool) {
        let watermark = if on { "0" } else { "0.4" };
        let status = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "-n",
                &self.node,
                "set_vm_memory_high_watermark",
                watermark,
            ])
            .status()
            .expect("rabbitmqctl");
        assert!(status.success());
    }

    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("the node's pid file");
        signal(pid.trim().parse().expect("a pid"), libc::SIGKILL);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "private RabbitMQ did not die"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the node again on the same port, with the same data (durable queues survive; a
    /// cluster member rejoins its cluster).
    pub fn restart(&self) {
        self.launch(free_port());
    }

    /// Makes this node a member of `seed`'s cluster (it loses its own data).
    pub fn join(&self, seed: &PrivateRabbit) {
        for args in [
            vec!["stop_app"],
            vec!["reset"],
            vec!["join_cluster", seed.node.as_str()],
            vec!["start_app"],
        ] {
            let output = std::process::Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node])
                .args(&args)
                .output()
                .expect("rabbitmqctl");
            assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
        }
    }

    /// Nodes running in this node's cluster, as it sees them.
    pub fn running_members(&self) -> usize {
        let output = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "-n",
                &self.node,
                "eval",
                "length(rabbit_mnesia:cluster_nodes(running)).",
            ])
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis of the test's own, which the test may stop.
pub struct PrivateRedis {
    pub port: u16,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let status = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-server");
        assert!(status.success());
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "private Redis did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .output();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "private Redis did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for a child process to exit, or panics at the deadline.
pub async fn wait_exit(
    child: &mut std::process::Child,
    deadline: Duration,
) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < deadline,
            "process did not exit within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closes every broker connection whose name (client property `information`) contains `name`,
/// as an operator or a network fault would; returns how many were closed.
pub fn close_connections(name: &str) -> usize {
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let text = String::from_utf8_lossy(&listed.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(name)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by a Kobe test"])
            .status()
            .expect("rabbitmqctl close_connection");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// A process a test started: stopped with SIGTERM (then SIGKILL if it lingers) and reaped when
/// dropped, so a test that panics leaves nothing running.
pub struct Process(Option<std::process::Child>);

impl Process {
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// Waits for it to exit by itself.
    pub fn wait(mut self) -> Option<std::process::ExitStatus> {
        self.0.take().and_then(|mut child| child.wait().ok())
    }

    /// Stops it now, as an operator would (SIGTERM), and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    /// Kills it (SIGKILL: no clean-up of its own), and waits for it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        // Gone already is as good as stopped.
        let _ = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.terminate();
    }
}
