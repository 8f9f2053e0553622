//! Issue "the machine": a real `tern run` boots each workload on KVM, heartbeats arrive, stop /
//! cont / quit behave like QEMU's, the guest's memory and counters are what the workload says,
//! and hostile QMP input does not hurt the VM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// stop → paused + STOP + no heartbeat; cont → RESUME + heartbeats continue.
fn stop_cont_cycle(vm: &mut Vm) {
    vm.assert_running_guest(5);
    let st = vm.run_status();
    assert_eq!(st, "running", "{}: status before stop", vm.name);
    vm.stop_vm();
    let last = vm.last_seq();
    assert!(last > 0, "{}: no heartbeat recorded before stop", vm.name);
    vm.assert_no_hb_after(last, Duration::from_millis(300));
    // A second `stop` is a harmless no-op, like QEMU's.
    vm.c("stop", json!({}));
    assert_eq!(vm.run_status(), "paused");
    vm.c("cont", json!({}));
    vm.event("RESUME", T);
    assert_eq!(vm.run_status(), "running", "{}: status after cont", vm.name);
    let next = vm.hb_after(last, T);
    assert!(next > last);
    // And it keeps beating.
    vm.hb_after(next + 10, T);
}

#[test]
fn idle_fill_heartbeats_stop_cont_quit() {
    let dir = tmpdir();
    let m = Machine::idle(16);
    let mut vm = boot(dir.path(), "idle", &m);
    vm.wait_workload_running(T);
    let st = vm.stats();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0]["workload"], "idle");
    assert_eq!(
        st[0]["pages-written"].as_u64(),
        Some(16 << 8),
        "fill writes every page of the 16 MiB share once: {st:?}"
    );
    stop_cont_cycle(&mut vm);

    // The fill content is a pure function of the GPA: check the whole area page by page.
    vm.stop_vm();
    let dump = dir.path().join("idle.dump");
    vm.pmemsave(&dump, m.dump_bytes());
    let mem = std::fs::read(&dump).expect("reading the dump");
    assert_eq!(mem.len() as u64, m.dump_bytes());
    let mut want = vec![0u8; 4096];
    let base = tern_guest::layout::WORK_BASE;
    for gpa in (base..m.dump_bytes()).step_by(4096) {
        tern_guest::fill::fill_page(gpa, &mut want);
        let got = &mem[gpa as usize..gpa as usize + 4096];
        assert!(got == &want[..], "page {gpa:#x} differs from fill_page");
    }
    vm.c("cont", json!({}));
    vm.event("RESUME", T);
    vm.assert_running_guest(5);
    vm.quit_ok();
}

#[test]
fn dirty_stop_cont_quit_and_counters() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 32, 32);
    let mut vm = boot(dir.path(), "dirty", &m);
    vm.wait_workload_running(T);
    let p0 = vm.pages_written();
    let p1 = vm.wait_pages_advance(&p0, T);
    stop_cont_cycle(&mut vm);

    // While stopped the counters stand still (the no-heartbeat window lets time pass).
    vm.stop_vm();
    let a = vm.pages_written();
    let last = vm.last_seq();
    vm.assert_no_hb_after(last, Duration::from_millis(300));
    let b = vm.pages_written();
    assert_eq!(a, b, "pages-written moved while the VM was paused");
    assert!(a[0] >= p1[0]);
    vm.c("cont", json!({}));
    vm.event("RESUME", T);
    vm.wait_pages_advance(&b, T);
    let st = vm.stats();
    assert_eq!(st[0]["workload"], "dirty");
    assert!(
        st[0]["passes"].as_u64().unwrap_or(0) >= 1
            || st[0]["pages-written"].as_u64().unwrap_or(0) > 0,
        "{st:?}"
    );
    vm.quit_ok();
}

#[test]
fn pattern_pmemsave_check_pattern_and_corruption() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut vm = boot(dir.path(), "pattern", &m);
    vm.wait_workload_running(T);
    let p0 = vm.pages_written();
    vm.wait_pages_advance(&p0, T);
    stop_cont_cycle(&mut vm);

    let dump = assert_pattern_ok(&mut vm, &m, dir.path(), "pattern");
    // The checker must catch one stale page: flip the first byte of a page in the middle.
    let mut mem = std::fs::read(&dump).expect("reading the dump");
    let victim = (tern_guest::layout::WORK_BASE + (m.work_mem << 20) / 2) as usize;
    mem[victim] ^= 0x80;
    let bad = dir.path().join("pattern-bad.dump");
    std::fs::write(&bad, &mem).expect("writing the corrupted dump");
    let (ok, text) = check_pattern(&bad);
    assert!(!ok, "check-pattern accepted a corrupted dump:\n{text}");
    assert!(
        text.contains("FAILED") || text.contains("bad"),
        "check-pattern output does not say what failed:\n{text}"
    );

    // The VM runs on after the dump.
    vm.c("cont", json!({}));
    vm.event("RESUME", T);
    vm.assert_running_guest(5);
    vm.quit_ok();
}

#[test]
fn prelaunch_with_dash_s_starts_on_cont() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 16).arg("-S");
    let mut vm = spawn(dir.path(), "prelaunch", &m.args());
    assert_eq!(vm.run_status(), "prelaunch");
    vm.assert_no_hb_after(0, Duration::from_millis(300));
    // `stop` in prelaunch changes nothing.
    vm.c("stop", json!({}));
    assert_eq!(vm.run_status(), "prelaunch");
    vm.c("cont", json!({}));
    vm.event("RESUME", T);
    assert_eq!(vm.run_status(), "running");
    // The guest boots from the start: the first heartbeat is #1.
    let recs = loop {
        vm.hb_after(0, T);
        let r = vm.heartbeats_since(0).expect("x-tern-heartbeats");
        if !r.is_empty() {
            break r;
        }
    };
    assert_eq!(recs[0].0, 1, "{recs:?}");
    vm.wait_workload_running(T);
    // quit while paused also exits cleanly.
    vm.stop_vm();
    vm.quit_ok();
}

#[test]
fn dirty_two_vcpus_both_advance() {
    let dir = tmpdir();
    let m = Machine::dirty(2, 32, 16);
    let mut vm = boot(dir.path(), "dirty2", &m);
    vm.wait_workload_running(T);
    let st = vm.stats();
    assert_eq!(st.len(), 2, "{st:?}");
    let bases: Vec<u64> = st
        .iter()
        .map(|s| s["work-base"].as_u64().unwrap_or(0))
        .collect();
    let lens: Vec<u64> = st
        .iter()
        .map(|s| s["work-len"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(bases[0], tern_guest::layout::WORK_BASE, "{st:?}");
    assert_eq!(
        bases[1],
        bases[0] + lens[0],
        "shares must be contiguous: {st:?}"
    );
    assert_eq!(lens[0] + lens[1], 32 << 20, "{st:?}");
    let p0 = vm.pages_written();
    let p1 = vm.wait_pages_advance(&p0, T);
    vm.wait_pages_advance(&p1, T);
    stop_cont_cycle(&mut vm);
    vm.quit_ok();
}

/// A raw QMP connection: bytes in, JSON lines out.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path, negotiate: bool) -> Raw {
        let s = UnixStream::connect(path).expect("connecting to QMP");
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        let mut raw = Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let g = raw.read().expect("greeting");
        assert!(g.get("QMP").is_some(), "greeting: {g}");
        if negotiate {
            raw.send(b"{\"execute\": \"qmp_capabilities\"}\n");
            let r = raw.read().expect("qmp_capabilities reply");
            assert!(r.get("return").is_some(), "{r}");
        }
        raw
    }

    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).expect("writing to QMP");
    }

    /// Next non-event message, None on EOF or a connection error.
    fn read(&mut self) -> Option<Value> {
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let v: Value = serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("server sent non-JSON {line:?}: {e}"));
            if v.get("event").is_none() {
                return Some(v);
            }
        }
    }

    fn reply(&mut self) -> Value {
        self.read().expect("the server closed the connection")
    }
}

fn err_class(v: &Value) -> (&str, &str) {
    (
        v.pointer("/error/class")
            .and_then(Value::as_str)
            .unwrap_or(""),
        v.pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or(""),
    )
}

#[test]
fn qmp_hostile_input_vm_keeps_running() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 16, 16);
    let mut vm = boot(dir.path(), "hostile", &m);
    let qmp = vm.qmp_path.clone();

    let mut c = Raw::connect(&qmp, true);
    // Malformed JSON: an error, and the connection stays usable.
    c.send(b"{\"execute\": }\n");
    let r = c.reply();
    let (class, desc) = err_class(&r);
    assert_eq!(class, "GenericError", "{r}");
    assert!(desc.contains("JSON parse error"), "{r}");
    c.send(b"{\"execute\": \"query-status\", \"id\": 1}\n");
    let r = c.reply();
    assert_eq!(r["id"], 1, "{r}");
    assert_eq!(r.pointer("/return/status"), Some(&json!("running")), "{r}");

    // Unknown command.
    c.send(b"{\"execute\": \"no-such-command\", \"id\": 2}\n");
    let r = c.reply();
    assert_eq!(r["id"], 2);
    assert_eq!(err_class(&r).0, "CommandNotFound", "{r}");

    // Wrong argument type.
    c.send(b"{\"execute\": \"pmemsave\", \"arguments\": {\"val\": \"zero\", \"size\": 4096, \"filename\": \"/dev/null\"}, \"id\": 3}\n");
    let r = c.reply();
    let (class, desc) = err_class(&r);
    assert_eq!(class, "GenericError", "{r}");
    assert!(desc.contains("val"), "{r}");

    // Out of range (past the end of RAM, and an overflowing range).
    let out = dir.path().join("never.dump");
    for (val, size) in [(m.memory_bytes() - 4096, 8192u64), (u64::MAX - 10, 4096)] {
        let req = json!({"execute": "pmemsave", "arguments": {"val": val, "size": size, "filename": out.display().to_string()}, "id": 4});
        c.send(format!("{req}\n").as_bytes());
        let r = c.reply();
        let (class, desc) = err_class(&r);
        assert_eq!(class, "GenericError", "{r}");
        assert!(desc.contains("Invalid addr"), "{r}");
    }
    assert!(!out.exists(), "pmemsave out of range created its file");

    // Missing argument.
    c.send(b"{\"execute\": \"pmemsave\", \"arguments\": {\"val\": 0}, \"id\": 5}\n");
    let r = c.reply();
    assert!(err_class(&r).1.contains("missing"), "{r}");
    drop(c);

    // A 16 MiB line: the server refuses it and closes the connection.
    let mut big = Raw::connect(&qmp, true);
    let mut line = Vec::with_capacity(16 << 20);
    line.extend_from_slice(b"{\"execute\": \"query-status\", \"arguments\": {\"x\": \"");
    line.resize((16 << 20) - 4, b'A');
    line.extend_from_slice(b"\"}}\n");
    let t0 = Instant::now();
    let mut write_failed = false;
    for chunk in line.chunks(64 << 10) {
        if big.w.write_all(chunk).is_err() {
            write_failed = true;
            break;
        }
    }
    // Whether or not the write got through, the server must end the connection.
    let mut replies = Vec::new();
    let closed = loop {
        match big.read() {
            Some(v) => replies.push(v),
            None => break true,
        }
        if t0.elapsed() > T {
            break false;
        }
    };
    assert!(
        closed,
        "a 16 MiB message did not close the connection; replies {replies:?}"
    );
    for r in &replies {
        assert!(
            r.get("error").is_some(),
            "a 16 MiB message got a non-error reply: {r}"
        );
    }
    let _ = write_failed;
    drop(big);

    // A client that disconnects with a command in flight (a blocking wait), and one that
    // disconnects in the middle of a message.
    let mut gone = Raw::connect(&qmp, true);
    gone.send(b"{\"execute\": \"x-tern-wait-heartbeat\", \"arguments\": {\"after\": 1000000000000, \"timeout-ms\": 1500}}\n");
    drop(gone);
    let mut half = Raw::connect(&qmp, true);
    half.send(b"{\"execute\": \"query-st");
    drop(half);
    // One that never negotiates and leaves.
    let mut shy = Raw::connect(&qmp, false);
    shy.send(b"{\"execute\": \"stop\"}\n");
    let r = shy.reply();
    assert_eq!(
        err_class(&r).0,
        "CommandNotFound",
        "before negotiation: {r}"
    );
    drop(shy);
    // Raw garbage bytes.
    let mut junk = Raw::connect(&qmp, true);
    junk.send(&[0xff, 0xfe, 0x00, 0x01, b'}', b']', b'\n']);
    junk.send(b"{\"execute\": \"query-status\", \"id\": \"after-junk\"}\n");
    let mut got = false;
    while let Some(r) = junk.read() {
        if r["id"] == "after-junk" {
            assert_eq!(r.pointer("/return/status"), Some(&json!("running")), "{r}");
            got = true;
            break;
        }
        assert!(r.get("error").is_some(), "{r}");
    }
    assert!(got, "no reply after resynchronising on garbage");
    drop(junk);

    // The VM is still running, the harness's own connection works, and a fresh client works.
    assert!(vm.try_exited().is_none(), "tern exited");
    vm.assert_running_guest(20);
    assert_eq!(vm.run_status(), "running");
    let mut fresh = Raw::connect(&qmp, true);
    fresh.send(b"{\"execute\": \"query-status\", \"id\": 9}\n");
    let r = fresh.reply();
    assert_eq!(r.pointer("/return/status"), Some(&json!("running")), "{r}");
    let p0 = vm.pages_written();
    vm.wait_pages_advance(&p0, T);
    drop(fresh);
    vm.quit_ok();
}
