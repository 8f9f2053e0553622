//! Pager tests on plain guest RAM (no KVM): real userfaultfd, faults from test threads (user
//! mode), and a scripted fault source for the batching and error paths. The KVM-guest tests
//! are in `crates/vmm/tests/postcopy.rs`.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::fault::{FaultSource, Wait};
use super::pager::Shared;
use super::uffd::Fault;
use super::*;
use crate::memory::{GuestRam, RamBackend, PAGE_SIZE};

const PAGES: u64 = 64;

fn ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(0, PAGES * PAGE_SIZE)], RamBackend::AnonymousPrivate).unwrap())
}

/// The "source" content of a page.
fn content(gpa: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE as usize];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (gpa / PAGE_SIZE) as u8 ^ (i as u8) | 1;
    }
    v
}

/// Records every request and forwards it to a serving thread (`None` stops it).
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<Vec<GpaRange>>>,
    tx: Mutex<Option<mpsc::Sender<Option<Vec<GpaRange>>>>>,
    refuse: Option<String>,
    failed: Mutex<Option<String>>,
}

impl PageRequester for Recorder {
    fn request(&self, ranges: &[GpaRange]) -> Result<(), String> {
        self.log.lock().unwrap().push(ranges.to_vec());
        if let Some(r) = &self.refuse {
            return Err(r.clone());
        }
        if let Some(tx) = &*self.tx.lock().unwrap() {
            tx.send(Some(ranges.to_vec())).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn fault_thread_failed(&self, error: &PagerError) {
        *self.failed.lock().unwrap() = Some(error_chain(error));
    }
}

impl Recorder {
    fn requested_pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .log
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .flat_map(|r| (0..r.pages()).map(move |i| r.gpa / PAGE_SIZE + i))
            .collect();
        v.sort_unstable();
        v
    }
}

/// A thread answering requests with [`content`], until `None`.
fn serve(
    pager: Arc<Pager>,
    rx: mpsc::Receiver<Option<Vec<GpaRange>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("test-serve".into())
        .spawn(move || {
            while let Ok(Some(ranges)) = rx.recv() {
                for r in ranges {
                    for i in 0..r.pages() {
                        let gpa = r.gpa + i * PAGE_SIZE;
                        pager.place(gpa, &content(gpa)).unwrap();
                    }
                }
            }
        })
        .unwrap()
}

fn read_page(ram: &GuestRam, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    ram.read_page(gpa, &mut buf).unwrap();
    buf
}

#[test]
fn this_host_can_page_on_demand() {
    // The test bed's promise (TESTBED.md: /dev/userfaultfd as root, kernel-mode faults).
    probe().unwrap();
}

#[test]
fn a_thread_reading_a_missing_page_waits_for_it_and_reads_what_was_placed() {
    let ram = ram();
    let (tx, rx) = mpsc::channel();
    let req = Arc::new(Recorder {
        tx: Mutex::new(Some(tx.clone())),
        ..Default::default()
    });
    let pager = Arc::new(Pager::start_all_missing(ram.clone(), req.clone()).unwrap());
    assert_eq!(pager.missing_pages(), PAGES);
    let server = serve(pager.clone(), rx);
    // Two readers of the same page and one of another: each page is requested once.
    let got: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = [5u64, 5, 9]
            .iter()
            .map(|&p| {
                let ram = &ram;
                s.spawn(move || read_page(ram, p * PAGE_SIZE))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // UFFDIO_COPY wakes a reader before the pager counts the placement: the counters are
    // final only once the server has placed both pages (CI once read pages_placed 1 here).
    tx.send(None).unwrap();
    server.join().unwrap();
    assert_eq!(got[0], content(5 * PAGE_SIZE));
    assert_eq!(got[1], content(5 * PAGE_SIZE));
    assert_eq!(got[2], content(9 * PAGE_SIZE));
    assert_eq!(
        req.requested_pages(),
        vec![5, 9],
        "each page requested exactly once"
    );
    let st = pager.stats();
    assert!(st.faults >= 2, "{st:?}");
    assert_eq!((st.pages_requested, st.pages_placed), (2, 2), "{st:?}");
    assert_eq!(st.bytes_placed, 2 * PAGE_SIZE);
    assert!(
        st.page_wait_total > std::time::Duration::ZERO && st.max_page_wait <= st.page_wait_total
    );
    assert!(pager.is_received(5 * PAGE_SIZE) && !pager.is_received(6 * PAGE_SIZE));
    assert_eq!(pager.missing_pages(), PAGES - 2);
    assert_eq!(pager.received_bitmaps(), vec![vec![(1 << 5) | (1 << 9)]]);
    let me = std::process::id() as i32;
    assert!(
        !pager.faulting_threads().is_empty() && !pager.faulting_threads().contains(&me),
        "faults come from the reader threads, not the main thread"
    );
    pager.shutdown().unwrap();
    pager.shutdown().unwrap();
    assert!(pager.failure().is_none());
}

#[test]
fn a_page_placed_before_any_fault_is_never_requested_and_a_second_arrival_is_eexist() {
    let ram = ram();
    let req = Arc::new(Recorder::default());
    let pager = Pager::start_all_missing(ram.clone(), req.clone()).unwrap();
    assert_eq!(
        pager.place(3 * PAGE_SIZE, &content(3 * PAGE_SIZE)).unwrap(),
        Placement::Placed
    );
    // Read without a server: if the pager requested it, this read would block forever.
    assert_eq!(read_page(&ram, 3 * PAGE_SIZE), content(3 * PAGE_SIZE));
    assert!(!pager.is_requested(3 * PAGE_SIZE));
    // The same page again: EEXIST, content unchanged.
    assert_eq!(
        pager.place(3 * PAGE_SIZE, &content(7 * PAGE_SIZE)).unwrap(),
        Placement::AlreadyPresent
    );
    assert_eq!(read_page(&ram, 3 * PAGE_SIZE), content(3 * PAGE_SIZE));
    // Zero pages: placed, then EEXIST for both kinds of second arrival.
    assert_eq!(pager.place_zero(4 * PAGE_SIZE).unwrap(), Placement::Placed);
    assert_eq!(
        pager.place_zero(4 * PAGE_SIZE).unwrap(),
        Placement::AlreadyPresent
    );
    assert_eq!(
        pager.place(4 * PAGE_SIZE, &content(4 * PAGE_SIZE)).unwrap(),
        Placement::AlreadyPresent
    );
    assert!(read_page(&ram, 4 * PAGE_SIZE).iter().all(|&b| b == 0));
    let st = pager.stats();
    assert_eq!(
        (st.pages_placed, st.zero_pages, st.already_present),
        (2, 1, 3),
        "{st:?}"
    );
    assert!(
        req.requested_pages().is_empty(),
        "{:?}",
        req.requested_pages()
    );
    assert_eq!(
        st.page_wait_total,
        std::time::Duration::ZERO,
        "nothing waited"
    );
    // Not one page of guest RAM.
    assert!(matches!(
        pager.place(PAGE_SIZE + 1, &content(0)),
        Err(PagerError::NotAPage { .. })
    ));
    assert!(pager.place(PAGES * PAGE_SIZE, &content(0)).is_err());
    assert!(pager.place(0, &[0u8; 100]).is_err());
    assert!(pager.place_zero(PAGES * PAGE_SIZE).is_err());
}

#[test]
fn only_pages_marked_missing_are_discarded_and_fetched() {
    let ram = ram();
    for p in 0..8 {
        ram.write_page(p * PAGE_SIZE, &content(100 * PAGE_SIZE))
            .unwrap();
    }
    let (tx, rx) = mpsc::channel();
    let req = Arc::new(Recorder {
        tx: Mutex::new(Some(tx.clone())),
        ..Default::default()
    });
    let missing = vec![vec![(1u64 << 2) | (1 << 3)]];
    let pager = Arc::new(Pager::start(ram.clone(), &missing, req.clone()).unwrap());
    let server = serve(pager.clone(), rx);
    assert_eq!(pager.missing_pages(), 2);
    assert_eq!(
        pager.received_bitmaps(),
        vec![vec![!((1u64 << 2) | (1 << 3))]]
    );
    // Kept pages keep their bytes, without a request; a never-written kept page reads zero.
    assert_eq!(read_page(&ram, PAGE_SIZE), content(100 * PAGE_SIZE));
    assert!(read_page(&ram, 40 * PAGE_SIZE).iter().all(|&b| b == 0));
    // A discarded page is fetched: the old bytes are gone.
    assert_eq!(read_page(&ram, 3 * PAGE_SIZE), content(3 * PAGE_SIZE));
    assert_eq!(req.requested_pages(), vec![3]);
    assert!(
        pager.stats().wakes >= 1,
        "the never-written page needed a zero page"
    );
    tx.send(None).unwrap();
    server.join().unwrap();
    pager.shutdown().unwrap();

    let e = Pager::start(ram.clone(), &[], req.clone()).unwrap_err();
    assert!(e.to_string().contains("0 bitmaps for 1 regions"), "{e}");
    let e = Pager::start(ram, &[vec![]], req).unwrap_err();
    assert!(e.to_string().contains("bitmap 0 words"), "{e}");
}

/// The early discard (decision 200): pages dropped with `discard_now` before the pager exists
/// are registered missing by `start_with_discard` without a second `MADV_DONTNEED`, and fetched.
#[test]
fn pages_dropped_early_are_fetched_and_only_the_discard_set_is_dropped_at_start() {
    let ram = ram();
    for p in 0..8 {
        ram.write_page(p * PAGE_SIZE, &content(100 * PAGE_SIZE))
            .unwrap();
    }
    // Runs outside guest RAM are refused before anything is dropped.
    let e = discard_now(&ram, &[(0, 2, 1), (0, 63, 2)]).unwrap_err();
    assert!(e.to_string().contains("region 0 pages 63+2"), "{e}");
    let e = discard_now(&ram, &[(1, 0, 1)]).unwrap_err();
    assert!(e.to_string().contains("outside guest RAM"), "{e}");
    // The early discard: pages 2 and 3 (not read afterwards: reading maps the zero page).
    discard_now(&ram, &[(0, 2, 2)]).unwrap();
    let (tx, rx) = mpsc::channel();
    let req = Arc::new(Recorder {
        tx: Mutex::new(Some(tx.clone())),
        ..Default::default()
    });
    // Missing: 2, 3 (dropped early), 5 (to drop now) and 6 (missing, deliberately left out of
    // the discard set: it shows that start drops only the discard set).
    let missing = vec![vec![(1u64 << 2) | (1 << 3) | (1 << 5) | (1 << 6)]];
    let discard = vec![vec![1u64 << 5]];
    let pager =
        Arc::new(Pager::start_with_discard(ram.clone(), &missing, &discard, req.clone()).unwrap());
    let server = serve(pager.clone(), rx);
    assert_eq!(pager.missing_pages(), 4);
    for p in [2, 3, 5] {
        assert_eq!(
            read_page(&ram, p * PAGE_SIZE),
            content(p * PAGE_SIZE),
            "page {p}"
        );
    }
    assert_eq!(req.requested_pages(), vec![2, 3, 5]);
    // Page 6 was not dropped at start: its old bytes are still mapped, read without a fault.
    assert_eq!(read_page(&ram, 6 * PAGE_SIZE), content(100 * PAGE_SIZE));
    assert_eq!(read_page(&ram, 4 * PAGE_SIZE), content(100 * PAGE_SIZE));
    assert_eq!(req.requested_pages(), vec![2, 3, 5]);
    tx.send(None).unwrap();
    server.join().unwrap();
    pager.shutdown().unwrap();
    let e = Pager::start_with_discard(ram, &missing, &[], req).unwrap_err();
    assert!(
        e.to_string().contains("0 discard bitmaps for 1 regions"),
        "{e}"
    );
}

/// One scripted drain (or the error the source fails with).
type Drain = Result<Vec<Fault>, PagerError>;

/// Faults from a test script: each message is one drain; a closed channel is a stop.
struct Script(mpsc::Receiver<Drain>);

impl FaultSource for Script {
    fn wait(&mut self, out: &mut Vec<Fault>) -> Result<Wait, PagerError> {
        match self.0.recv() {
            Ok(Ok(f)) => {
                out.extend(f);
                Ok(Wait::Faults)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(Wait::Stop),
        }
    }
}

fn scripted(req: Arc<Recorder>) -> (Pager, Arc<GuestRam>, mpsc::Sender<Drain>) {
    let ram = ram();
    let all = vec![vec![u64::MAX; 1]];
    let shared = Arc::new(Shared::prepare(ram.clone(), &all, &all, req).unwrap());
    let (tx, rx) = mpsc::channel();
    let pager = Pager::spawn(
        shared,
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Box::new(Script(rx)),
    )
    .unwrap();
    (pager, ram, tx)
}

fn fault_at(ram: &GuestRam, page: u64) -> Fault {
    Fault {
        addr: ram.regions()[0].host_addr + page * PAGE_SIZE + 123,
        tid: 42,
    }
}

#[test]
fn one_drain_is_one_batch_of_coalesced_deduplicated_ranges() {
    let (tx, rx) = mpsc::channel();
    let req = Arc::new(Recorder {
        tx: Mutex::new(Some(tx)),
        ..Default::default()
    });
    let (pager, ram, faults) = scripted(req.clone());
    pager.place(3 * PAGE_SIZE, &content(3 * PAGE_SIZE)).unwrap();
    let f = |p| fault_at(&ram, p);
    faults
        .send(Ok(vec![f(5), f(6), f(5), f(7), f(20), f(3)]))
        .unwrap();
    let batch = rx.recv().unwrap().unwrap();
    assert_eq!(
        batch,
        vec![
            GpaRange {
                gpa: 5 * PAGE_SIZE,
                len: 3 * PAGE_SIZE
            },
            GpaRange {
                gpa: 20 * PAGE_SIZE,
                len: PAGE_SIZE
            },
        ]
    );
    // In flight (6) and here (3) again, plus one new page: only the new one is asked for.
    faults.send(Ok(vec![f(6), f(3), f(21)])).unwrap();
    let batch = rx.recv().unwrap().unwrap();
    assert_eq!(
        batch,
        vec![GpaRange {
            gpa: 21 * PAGE_SIZE,
            len: PAGE_SIZE
        }]
    );
    // Only already-requested pages: no request at all. Then a new one, to see the order.
    faults.send(Ok(vec![f(20), f(7)])).unwrap();
    faults.send(Ok(vec![f(30)])).unwrap();
    let batch = rx.recv().unwrap().unwrap();
    assert_eq!(
        batch[0].gpa,
        30 * PAGE_SIZE,
        "the in-flight-only drain sent nothing"
    );
    let st = pager.stats();
    assert_eq!(st.faults, 12, "{st:?}");
    assert_eq!(
        (st.batches, st.requests, st.pages_requested),
        (3, 4, 6),
        "{st:?}"
    );
    assert_eq!(st.wakes, 2, "page 3 faulted twice while present: {st:?}");
    assert_eq!(pager.faulting_threads(), vec![42]);
    drop(faults);
    pager.shutdown().unwrap();
}

#[test]
fn a_failed_read_stops_the_fault_thread_and_is_reported() {
    let req = Arc::new(Recorder::default());
    let (pager, _ram, faults) = scripted(req.clone());
    faults
        .send(Err(PagerError::Read(userfaultfd::Error::ReadEof)))
        .unwrap();
    let e = pager.shutdown().unwrap_err();
    assert!(matches!(e, PagerError::Read(_)), "{e}");
    let f = pager.failure().expect("failure kept");
    assert!(
        f.contains("reading userfaultfd events") && f.contains("EOF"),
        "{f}"
    );
    assert_eq!(req.failed.lock().unwrap().as_deref(), Some(f.as_str()));
}

#[test]
fn a_refused_request_stops_the_fault_thread_with_the_reason() {
    let req = Arc::new(Recorder {
        refuse: Some("return path closed".into()),
        ..Default::default()
    });
    let (pager, ram, faults) = scripted(req.clone());
    faults.send(Ok(vec![fault_at(&ram, 1)])).unwrap();
    let e = pager.shutdown().unwrap_err();
    let msg = error_chain(&e);
    assert!(
        msg.contains("return path closed") && msg.contains("1 pages"),
        "{msg}"
    );
    assert!(req.failed.lock().unwrap().is_some());
    // A fault outside guest RAM is an error too (the faulter would hang otherwise).
    let req = Arc::new(Recorder::default());
    let (pager, _ram, faults) = scripted(req);
    faults.send(Ok(vec![Fault { addr: 16, tid: 1 }])).unwrap();
    assert!(matches!(
        pager.shutdown().unwrap_err(),
        PagerError::UnknownFault { addr: 16 }
    ));
}
