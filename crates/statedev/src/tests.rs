//! Handler ↔ loader without the engine: the protocol, the approval rule, hostile input.

use std::sync::{Arc, Condvar, Mutex};

use tern_migration::machine::{StateHandler, StateLoader, SwitchoverApproval};

use crate::format::{put_data, put_final, put_init_done, put_meta, DATA_INITIAL};
use crate::{StateDevConfig, StateDevice};

fn cfg(s: &str) -> StateDevConfig {
    StateDevConfig::parse(s).unwrap()
}

/// Counts approvals (a second one is an error, like the engine's).
#[derive(Default)]
struct Approvals(Mutex<u32>, Condvar);

impl Approvals {
    fn count(&self) -> u32 {
        *self.0.lock().unwrap()
    }

    /// Blocks until at least one approval arrived.
    fn wait(&self) {
        let mut g = self.0.lock().unwrap();
        while *g == 0 {
            g = self.1.wait(g).unwrap();
        }
    }
}

fn counting_approval() -> (SwitchoverApproval, Arc<Approvals>) {
    let n = Arc::new(Approvals::default());
    let c = n.clone();
    let a = SwitchoverApproval::new(move || {
        let mut g = c.0.lock().unwrap();
        *g += 1;
        c.1.notify_all();
        if *g == 1 {
            Ok(())
        } else {
            Err("approved twice".into())
        }
    });
    (a, n)
}

/// Drains the handler's pre-copy data into the loader with `budget`-byte calls.
fn precopy(h: &mut dyn StateHandler, l: &mut dyn StateLoader, budget: usize) -> usize {
    let mut calls = 0;
    loop {
        let mut out = Vec::new();
        h.save_iterate(budget, &mut out).unwrap();
        if out.is_empty() {
            return calls;
        }
        assert!(out.len() <= budget, "{} > budget {budget}", out.len());
        l.load_iterate(1, &out).unwrap();
        calls += 1;
    }
}

#[test]
fn state_moves_with_mutations_and_the_ack_waits_for_both_conditions() {
    let c = cfg("size=256K,chunk=16K,dirty-rate=0,setup-ms=20,seed=3");
    let src = StateDevice::new(c.clone()).unwrap();
    let dst = StateDevice::new_incoming(c).unwrap();
    let mut h = src.handler();
    let mut l = dst.loader();
    h.save_setup().unwrap();
    assert!(l.switchover_ack_needed());
    let (approval, approvals) = counting_approval();
    l.load_setup(approval).unwrap();
    let total = h.pending_estimate();
    assert!(total > 256 << 10);
    // A first small piece, then mutations in chunks already passed and ahead of the pass.
    let mut out = Vec::new();
    h.save_iterate(40 << 10, &mut out).unwrap();
    l.load_iterate(1, &out).unwrap();
    src.mutate(20).unwrap();
    let calls = precopy(&mut h, &mut l, 4096);
    assert!(calls > 60, "small budget, many chunks: {calls}");
    approvals.wait();
    let st = dst.stats();
    assert!(st.init_done_received && st.prep_finished && st.approved);
    assert_eq!(approvals.count(), 1);
    // More mutations after the initial data: re-sent as dirty chunks.
    src.mutate(5).unwrap();
    assert!(h.pending_exact().unwrap() >= 16 << 10);
    precopy(&mut h, &mut l, 64 << 10);
    src.mutate(3).unwrap();
    let fin = h.save_complete().unwrap();
    let s = src.stats();
    assert!(s.final_dirty_bytes > 0 && s.resent_chunks > 0);
    assert_eq!(s.switch_digest, src.digest());
    l.load_complete(1, &fin).unwrap();
    h.save_cleanup();
    l.load_cleanup();
    assert_eq!(dst.digest(), src.digest());
    let d = dst.stats();
    assert_eq!(d.loaded_digest, src.digest());
    assert_eq!(d.mutations, 28);
    assert!(!d.prep_thread_running);
    assert_eq!(approvals.count(), 1);
}

#[test]
fn without_the_capability_it_never_approves_and_load_complete_waits_for_the_preparation() {
    // The preparation (1 s) must still run when `load_complete` comes: the in-memory pre-copy
    // of 256 KiB takes microseconds, so even a loaded host leaves a wide margin (50 ms did not:
    // seen once under load).
    let c = cfg("size=64K,chunk=4K,dirty-rate=0,setup-ms=1000");
    let src = StateDevice::new(c.clone()).unwrap();
    let dst = StateDevice::new_incoming(c).unwrap();
    let (mut h, mut l) = (src.handler(), dst.loader());
    h.save_setup().unwrap();
    let (approval, approvals) = counting_approval();
    l.load_setup(approval).unwrap(); // switchover_ack_needed() not asked: capability off
    precopy(&mut h, &mut l, 256 << 10);
    let fin = h.save_complete().unwrap();
    l.load_complete(1, &fin).unwrap();
    let d = dst.stats();
    assert!(d.prep_finished && d.prep_wait_in_downtime_ms.is_some());
    assert_eq!(approvals.count(), 0);
    assert_eq!(dst.digest(), src.digest());
    l.load_cleanup();
}

#[test]
fn hang_never_approves_and_cleanup_does_not_block() {
    let c = cfg("size=64K,chunk=4K,dirty-rate=0,hang=on");
    let src = StateDevice::new(c.clone()).unwrap();
    let dst = StateDevice::new_incoming(c).unwrap();
    let (mut h, mut l) = (src.handler(), dst.loader());
    h.save_setup().unwrap();
    l.switchover_ack_needed();
    let (approval, approvals) = counting_approval();
    l.load_setup(approval).unwrap();
    precopy(&mut h, &mut l, 256 << 10);
    assert!(dst.stats().init_done_received && dst.stats().prep_thread_running);
    let fin = h.save_complete().unwrap();
    let e = l.load_complete(1, &fin).unwrap_err().to_string();
    assert!(e.contains("hang=on"), "{e}");
    l.load_cleanup();
    let d = dst.stats();
    assert!(!d.prep_thread_running && !d.prep_finished && !d.approved);
    assert_eq!(approvals.count(), 0);
    assert!(!dst.has_state(), "a failed load leaves nothing");
}

/// A loader that has seen a valid META for a 64 KiB device, ready for a hostile record.
fn loader_after_meta() -> (StateDevice, crate::StateDevLoader) {
    let dst = StateDevice::new_incoming(cfg("size=64K,chunk=4K,dirty-rate=0")).unwrap();
    let mut l = dst.loader();
    l.load_setup(SwitchoverApproval::new(|| Ok(()))).unwrap();
    let mut m = Vec::new();
    put_meta(&mut m, 64 << 10, 4096, 1);
    l.load_iterate(1, &m).unwrap();
    (dst, l)
}

#[test]
fn hostile_records_are_rejected_with_their_reason() {
    let data = |flags, off: u64, len: usize| {
        let mut b = Vec::new();
        put_data(&mut b, flags, off, &vec![1u8; len]);
        b
    };
    let mut meta_other_size = Vec::new();
    put_meta(&mut meta_other_size, 300 << 20, 1 << 20, 1);
    let mut meta_bad_chunk = Vec::new();
    put_meta(&mut meta_bad_chunk, 64 << 10, 100, 1);
    let mut fin = Vec::new();
    put_final(&mut fin, 1, 1);
    let mut early_done = Vec::new();
    put_init_done(&mut early_done, 64 << 10);
    let mut second_meta = Vec::new();
    put_meta(&mut second_meta, 64 << 10, 4096, 1);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (data(0, 0, 512), "DATA before META"),
        (meta_other_size.clone(), "device size is 314572800 bytes"),
        (meta_bad_chunk.clone(), "chunk size"),
        (vec![2, 0, 0], "truncated"),
        (vec![9], "unknown record tag"),
    ];
    for (payload, needle) in cases {
        let dst = StateDevice::new_incoming(cfg("size=64K,chunk=4K")).unwrap();
        let mut l = dst.loader();
        l.load_setup(SwitchoverApproval::new(|| Ok(()))).unwrap();
        let e = l.load_iterate(1, &payload).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
        l.load_cleanup();
    }
    let after_meta: Vec<(Vec<u8>, &str)> = vec![
        (second_meta, "second META"),
        (data(0, 64 << 10, 512), "outside"),
        (data(0, u64::MAX - 511, 512), "outside"),
        (data(0, 100, 512), "aligned"),
        (data(0, 0, 100), "aligned"),
        (data(0, 0, 0), "empty"),
        (data(0x80, 0, 512), "flags"),
        (data(DATA_INITIAL, 4096, 512), "out of order"),
        (early_done, "delivered 0 of 65536"),
        (fin.clone(), "FINAL in pre-copy"),
    ];
    for (payload, needle) in after_meta {
        let (_d, mut l) = loader_after_meta();
        let e = l.load_iterate(1, &payload).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
        l.load_cleanup();
    }
    let (_d, mut l) = loader_after_meta();
    let e = l.load_iterate(2, &data(0, 0, 512)).unwrap_err().to_string();
    assert!(e.contains("state version"), "{e}");
    let e = l.load_complete(1, &fin).unwrap_err().to_string();
    assert!(e.contains("initial data was complete"), "{e}");
    l.load_cleanup();
}

#[test]
fn final_state_checks_and_digest_mismatch() {
    let c = cfg("size=64K,chunk=4K,dirty-rate=0");
    let src = StateDevice::new(c.clone()).unwrap();
    let run = |tamper: &dyn Fn(&mut Vec<u8>)| {
        let dst = StateDevice::new_incoming(c.clone()).unwrap();
        let (mut h, mut l) = (src.handler(), dst.loader());
        h.save_setup().unwrap();
        l.load_setup(SwitchoverApproval::new(|| Ok(()))).unwrap();
        precopy(&mut h, &mut l, 8192);
        let mut fin = h.save_complete().unwrap();
        tamper(&mut fin);
        let r = l.load_complete(1, &fin).map_err(|e| e.to_string());
        h.save_cleanup();
        l.load_cleanup();
        (r, dst)
    };
    let (r, dst) = run(&|_| {});
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(dst.digest(), src.digest());
    let (r, dst) = run(&|f| f[1] ^= 1); // FINAL's digest
    let e = r.unwrap_err();
    assert!(e.contains("digest mismatch"), "{e}");
    assert!(!dst.has_state());
    let (r, _) = run(&|f| f.push(3));
    assert!(r.unwrap_err().contains("truncated"));
    let (r, _) = run(&|f| f.clear());
    assert!(r.unwrap_err().contains("without FINAL"));
    let (r, _) = run(&|f| f.extend_from_slice(&[4; 17]));
    assert!(r.unwrap_err().contains("after FINAL"));
}

#[test]
fn random_garbage_never_panics() {
    let mut x = 0x1234_5678_u64;
    for round in 0..2000 {
        let (_d, mut l) = loader_after_meta();
        let len = (round % 97) + 1;
        let mut buf = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8 % 6);
        }
        let _ = l.load_iterate(1, &buf);
        let _ = l.load_complete(1, &buf);
        l.load_cleanup();
    }
}
