//! Driver tests against the fake controller.

// Test-only code: values are small and known (fake addresses, page counts, tags), so plain casts are clear.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
extern crate std;

use std::vec;
use std::vec::Vec;

use super::fake::FakeNvme;
use super::*;

fn config(pairs: u16) -> Config {
    Config {
        io_queue_pairs: pairs,
        io_entries: 16,
        io_timeout_us: 1_000,
        admin_timeout_us: 1_000,
        health_interval_us: 50,
        ..Config::default()
    }
}

fn fake() -> FakeNvme {
    // nsid 1: 512-byte blocks, 4096 of them; nsid 3: 4 KiB blocks, 1024 of them (nsid 2 absent).
    FakeNvme::new(vec![FakeNvme::ns(1, 9, 4096), FakeNvme::ns(3, 12, 1024)])
}

fn up(pairs: u16) -> Controller<FakeNvme> {
    match Controller::new(fake(), config(pairs)) {
        Ok(c) => c,
        Err((e, _)) => panic!("bring-up failed: {e:?}"),
    }
}

fn poll_all(c: &mut Controller<FakeNvme>, qid: u16, want: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        c.poll(qid, &mut |x| got.push(x));
        if got.len() >= want {
            break;
        }
    }
    assert_eq!(got.len(), want, "completions: {got:?}");
    got
}

fn buffer(c: &mut Controller<FakeNvme>, pages: usize, fill: impl Fn(usize) -> u8) -> u64 {
    let phys = c.hal_mut().alloc_pages(pages).expect("fake memory");
    let data: Vec<u8> = (0..pages * 4096).map(fill).collect();
    c.hal_mut().write(phys, &data);
    phys
}

fn read_back(c: &mut Controller<FakeNvme>, phys: u64, bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    c.hal_mut().read(phys, &mut out);
    out
}

#[test]
fn bring_up_resets_an_enabled_controller_and_identifies() {
    let c = up(4);
    let f = &c.hal;
    assert_eq!(
        f.resets, 1,
        "controller left enabled by firmware must be disabled first"
    );
    assert!(f.enabled());
    assert_eq!(c.info().vid, 0x1b36);
    assert_eq!(std::format!("{}", c.info().serial), "cv0");
    assert_eq!(std::format!("{}", c.info().model), "QEMU NVMe Ctrl");
    assert_eq!(c.version().major(), 1);
    let ns = c.namespaces();
    assert_eq!(ns.len(), 2);
    assert_eq!((ns[0].nsid, ns[0].lba_size, ns[0].blocks), (1, 512, 4096));
    assert_eq!((ns[1].nsid, ns[1].lba_size, ns[1].blocks), (3, 4096, 1024));
    assert_eq!(c.io_queues(), 4);
    assert_eq!(c.queue_capacity(), 15);
    // MDTS 7 with 4 KiB minimum pages.
    assert_eq!(c.max_transfer_bytes(), 512 * 1024);
    assert_eq!(
        &f.admin_log[..4],
        &[
            admin::IDENTIFY,
            admin::IDENTIFY,
            admin::IDENTIFY,
            admin::IDENTIFY
        ]
    );
    assert!(f.admin_log.contains(&admin::SET_FEATURES));
    let creates = f
        .admin_log
        .iter()
        .filter(|&&o| o == admin::CREATE_IO_SQ)
        .count();
    assert_eq!(creates, 4);
}

#[test]
fn controller_grants_fewer_queues_than_wanted() {
    let mut f = fake();
    f.max_queues = 2;
    let c = Controller::new(f, config(8))
        .map_err(|(e, _)| e)
        .expect("bring-up");
    assert_eq!(c.io_queues(), 2);
}

#[test]
fn enable_timeout_fails_cleanly_and_frees_memory() {
    let mut f = fake();
    f.refuse_enable = true;
    let Err((e, f)) = Controller::new(f, config(1)) else {
        panic!("must fail")
    };
    assert_eq!(e, NvmeError::EnableTimeout);
    assert_eq!(f.live_pages, 0);
    assert!(!f.enabled(), "left disabled");
}

#[test]
fn wedged_admin_queue_times_out_and_frees_memory() {
    let mut f = fake();
    f.hang_admin = true;
    let Err((e, f)) = Controller::new(f, config(1)) else {
        panic!("must fail")
    };
    assert_eq!(
        e,
        NvmeError::AdminTimeout {
            opcode: admin::IDENTIFY
        }
    );
    assert_eq!(f.live_pages, 0);
    assert!(!f.enabled());
}

#[test]
fn unsupported_page_size_is_refused() {
    let mut f = fake();
    f.cap |= 0x1 << 48; // MPSMIN = 8 KiB
    let Err((e, _)) = Controller::new(f, config(1)) else {
        panic!("must fail")
    };
    assert_eq!(e, NvmeError::Unsupported("4 KiB memory pages"));
}

#[test]
fn writes_and_reads_back_with_one_two_and_listed_prps() {
    let mut c = up(2);
    // (nsid, lba, blocks, pages, uses PRP list)
    let cases = [
        (1u32, 8u64, 8u32, 1usize, false),
        (1, 100, 16, 2, false),
        (3, 7, 5, 5, true),
        (3, 896, 128, 128, true),
    ];
    for (i, &(nsid, lba, blocks, pages, list)) in cases.iter().enumerate() {
        let tag = i as u64;
        let src = buffer(&mut c, pages, |b| (b as u8) ^ (tag as u8 * 37 + 1));
        let req = IoRequest::contiguous(
            tag,
            nsid,
            IoOp::Write,
            lba,
            blocks,
            src,
            pages as u64 * 4096,
        );
        c.submit(1, req)
            .map_err(|r| r.error)
            .expect("write accepted");
        let done = poll_all(&mut c, 1, 1);
        assert_eq!(
            done[0],
            Completion {
                tag,
                status: Status::SUCCESS,
                retries: 0
            }
        );
        assert_eq!(c.hal.io_log.last().map(|l| l.2), Some(list));
        let dst = buffer(&mut c, pages, |_| 0);
        // Read on the other queue with the pages in a scattered order that the PRPs must preserve.
        let req = IoRequest::contiguous(
            tag + 100,
            nsid,
            IoOp::Read,
            lba,
            blocks,
            dst,
            pages as u64 * 4096,
        );
        c.submit(2, req).expect("read accepted");
        let done = poll_all(&mut c, 2, 1);
        assert!(done[0].status.is_success());
        assert_eq!(
            read_back(&mut c, dst, pages * 4096),
            read_back(&mut c, src, pages * 4096)
        );
    }
    assert_eq!(c.stats().submitted, 8);
    assert_eq!(c.stats().completed, 8);
}

#[test]
fn scattered_pages_keep_their_order() {
    let mut c = up(1);
    let pages: Vec<u64> = (0..4)
        .map(|i| buffer(&mut c, 1, move |_| 0xA0 + i as u8))
        .collect();
    let mut order = pages.clone();
    order.reverse();
    let req = IoRequest {
        tag: 1,
        nsid: 3,
        op: IoOp::Write,
        lba: 0,
        blocks: 4,
        pages: order,
    };
    c.submit(1, req).expect("accepted");
    poll_all(&mut c, 1, 1);
    let disk = &c.hal.namespaces[1].data;
    for (i, expect) in [0xA3u8, 0xA2, 0xA1, 0xA0].iter().enumerate() {
        assert!(
            disk[i * 4096..(i + 1) * 4096].iter().all(|b| b == expect),
            "page {i}"
        );
    }
}

#[test]
fn bad_requests_are_given_back_with_a_reason() {
    let mut c = up(1);
    let p = buffer(&mut c, 1, |_| 0);
    let r = |nsid, lba, blocks, pages: Vec<u64>| IoRequest {
        tag: 9,
        nsid,
        op: IoOp::Read,
        lba,
        blocks,
        pages,
    };
    let err = |c: &mut Controller<FakeNvme>, q, req: IoRequest| {
        c.submit(q, req.clone()).map_err(|x| {
            assert_eq!(x.request, req, "request handed back untouched");
            x.error
        })
    };
    assert_eq!(
        err(&mut c, 1, r(2, 0, 1, vec![p])),
        Err(NvmeError::UnknownNamespace(2))
    );
    assert_eq!(
        err(&mut c, 1, r(1, 4095, 2, vec![p])),
        Err(NvmeError::OutOfRange {
            lba: 4095,
            blocks: 2,
            size: 4096
        })
    );
    assert_eq!(
        err(&mut c, 1, r(1, u64::MAX, 2, vec![p]))
            .map_err(|e| matches!(e, NvmeError::OutOfRange { .. })),
        Err(true)
    );
    assert_eq!(
        err(&mut c, 1, r(1, 0, 0, vec![p])).map_err(|e| matches!(e, NvmeError::OutOfRange { .. })),
        Err(true)
    );
    assert_eq!(
        err(&mut c, 1, r(1, 0, 16, vec![p])),
        Err(NvmeError::BadBuffer)
    );
    assert_eq!(
        err(&mut c, 1, r(1, 0, 1, vec![p + 512])),
        Err(NvmeError::BadBuffer)
    );
    assert_eq!(
        err(&mut c, 1, r(3, 0, 129, vec![p; 129])),
        Err(NvmeError::TooLarge {
            bytes: 129 * 4096,
            max: 512 * 1024
        })
    );
    assert_eq!(
        err(&mut c, 2, r(1, 0, 1, vec![p])),
        Err(NvmeError::BadQueue(2))
    );
    assert_eq!(
        err(&mut c, 0, r(1, 0, 1, vec![p])),
        Err(NvmeError::BadQueue(0))
    );
    let flush_with_data = IoRequest {
        op: IoOp::Flush,
        ..r(1, 0, 1, vec![p])
    };
    assert_eq!(err(&mut c, 1, flush_with_data), Err(NvmeError::BadBuffer));
    assert_eq!(c.stats().submitted, 0);
}

#[test]
fn full_queue_refuses_then_accepts_after_poll() {
    let mut c = up(1);
    let p = buffer(&mut c, 1, |_| 0);
    for t in 0..15 {
        c.submit(1, IoRequest::contiguous(t, 1, IoOp::Read, t, 1, p, 512))
            .expect("room");
    }
    let again = IoRequest::contiguous(99, 1, IoOp::Read, 0, 1, p, 512);
    assert_eq!(
        c.submit(1, again.clone()).map_err(|r| r.error),
        Err(NvmeError::QueueFull)
    );
    assert_eq!(c.outstanding(1), 15);
    let done = poll_all(&mut c, 1, 15);
    let mut tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..15).collect::<Vec<_>>());
    c.submit(1, again).expect("room again");
    poll_all(&mut c, 1, 1);
}

#[test]
fn phase_tags_survive_many_wraps() {
    let mut c = up(1);
    let p = buffer(&mut c, 1, |_| 0);
    let mut delivered = 0u64;
    let mut next = 0u64;
    let total = 16 * 20;
    while delivered < total {
        while next < total
            && c.submit(
                1,
                IoRequest::contiguous(next, 1, IoOp::Read, next % 4000, 1, p, 512),
            )
            .is_ok()
        {
            next += 1;
        }
        c.poll(1, &mut |d| {
            assert!(d.status.is_success());
            delivered += 1;
        });
    }
    assert_eq!(c.stats().completed, total);
    assert_eq!(c.stats().spurious, 0);
}

#[test]
fn media_error_is_reported_and_others_succeed() {
    let mut c = up(1);
    c.hal.bad_lba = Some(50);
    let p = buffer(&mut c, 3, |_| 0);
    c.submit(1, IoRequest::contiguous(1, 1, IoOp::Read, 49, 2, p, 1024))
        .expect("ok");
    c.submit(
        1,
        IoRequest::contiguous(2, 1, IoOp::Read, 10, 1, p + 4096, 512),
    )
    .expect("ok");
    c.submit(
        1,
        IoRequest {
            tag: 3,
            nsid: 1,
            op: IoOp::Flush,
            lba: 0,
            blocks: 0,
            pages: vec![],
        },
    )
    .expect("ok");
    let done = poll_all(&mut c, 1, 3);
    assert_eq!(done[0].status, Status::UNRECOVERED_READ);
    assert_eq!(done[0].status.kind(), StatusType::Media);
    assert!(done[1].status.is_success() && done[2].status.is_success());
}

#[test]
fn spurious_completion_is_counted_not_delivered() {
    let mut c = up(1);
    c.hal.inject_spurious = true;
    let p = buffer(&mut c, 1, |_| 0);
    c.submit(1, IoRequest::contiguous(5, 1, IoOp::Read, 0, 1, p, 512))
        .expect("ok");
    let done = poll_all(&mut c, 1, 1);
    assert_eq!(done[0].tag, 5);
    assert_eq!(c.stats().spurious, 1);
}

#[test]
fn timed_out_command_is_aborted_and_completes_with_timeout() {
    let mut c = up(1);
    c.hal.hang_io = true;
    let p = buffer(&mut c, 1, |_| 0);
    c.submit(1, IoRequest::contiguous(7, 1, IoOp::Read, 0, 1, p, 512))
        .expect("ok");
    let done = poll_all(&mut c, 1, 1);
    assert_eq!(
        done[0],
        Completion {
            tag: 7,
            status: Status::TIMED_OUT,
            retries: 0
        }
    );
    assert!(done[0].status.do_not_retry());
    assert_eq!(c.stats().aborts, 1);
    assert_eq!(c.stats().resets, 0);
    assert!(c.hal.admin_log.contains(&admin::ABORT));
}

#[test]
fn ignored_abort_leads_to_reset_and_requeue() {
    let mut c = up(2);
    c.hal.hang_io = true;
    c.hal.abort_works = false;
    let src = buffer(&mut c, 1, |b| b as u8);
    let pattern = read_back(&mut c, src, 512);
    c.hal.namespaces[0].data[..512].copy_from_slice(&pattern);
    let a = buffer(&mut c, 1, |_| 0);
    let b = buffer(&mut c, 1, |_| 0);
    c.submit(1, IoRequest::contiguous(1, 1, IoOp::Read, 0, 1, a, 512))
        .expect("ok");
    c.submit(2, IoRequest::contiguous(2, 1, IoOp::Read, 0, 1, b, 512))
        .expect("ok");
    assert_eq!(c.hal.held(), 0, "staged, not yet visible to the controller");
    c.flush(1);
    c.flush(2);
    assert_eq!(c.hal.held(), 2);
    // Poll queue 1 until the abort has been sent, then let the device work again.
    let mut got = Vec::new();
    while c.stats().aborts == 0 {
        c.poll(1, &mut |x| got.push(x));
    }
    c.hal.hang_io = false;
    got.extend(poll_all(&mut c, 1, 1));
    assert_eq!(
        got,
        vec![Completion {
            tag: 1,
            status: Status::SUCCESS,
            retries: 1
        }]
    );
    // The innocent command on queue 2 was lost by the reset too, and re-issued.
    let other = poll_all(&mut c, 2, 1);
    assert_eq!(
        other,
        vec![Completion {
            tag: 2,
            status: Status::SUCCESS,
            retries: 1
        }]
    );
    assert_eq!(c.stats().resets, 1);
    assert_eq!(c.stats().requeued, 2);
    assert_eq!(c.hal.resets, 2, "bring-up reset plus recovery reset");
    assert_eq!(read_back(&mut c, a, 512), read_back(&mut c, src, 512));
    assert_eq!(read_back(&mut c, b, 512), read_back(&mut c, src, 512));
}

#[test]
fn command_that_never_completes_fails_after_retry_budget() {
    let mut c = up(1);
    c.hal.hang_io = true;
    c.hal.abort_works = false;
    let p = buffer(&mut c, 1, |_| 0);
    c.submit(1, IoRequest::contiguous(3, 1, IoOp::Write, 0, 1, p, 512))
        .expect("ok");
    let done = poll_all(&mut c, 1, 1);
    assert_eq!(
        done,
        vec![Completion {
            tag: 3,
            status: Status::TIMED_OUT,
            retries: 2
        }]
    );
    assert_eq!(c.stats().resets, 3);
    assert!(!c.is_failed(), "the controller itself still works");
    c.hal.hang_io = false;
    c.submit(1, IoRequest::contiguous(4, 1, IoOp::Write, 0, 1, p, 512))
        .expect("ok");
    assert!(poll_all(&mut c, 1, 1)[0].status.is_success());
}

#[test]
fn fatal_status_resets_and_requeues() {
    let mut c = up(1);
    c.hal.hang_io = true;
    let p = buffer(&mut c, 1, |_| 0);
    c.submit(1, IoRequest::contiguous(8, 1, IoOp::Read, 0, 1, p, 512))
        .expect("ok");
    c.flush(1);
    assert_eq!(c.hal.held(), 1);
    c.hal.set_fatal();
    c.hal.hang_io = false;
    let done = poll_all(&mut c, 1, 1);
    assert_eq!(
        done,
        vec![Completion {
            tag: 8,
            status: Status::SUCCESS,
            retries: 1
        }]
    );
    assert_eq!(c.stats().fatal_events, 1);
    assert_eq!(c.stats().resets, 1);
}

#[test]
fn failed_reset_completes_everything_with_an_error() {
    let mut c = up(1);
    c.hal.hang_io = true;
    let p = buffer(&mut c, 1, |_| 0);
    for t in 0..3 {
        c.submit(1, IoRequest::contiguous(t, 1, IoOp::Read, t, 1, p, 512))
            .expect("ok");
    }
    c.hal.set_fatal();
    c.hal.refuse_enable = true;
    let done = poll_all(&mut c, 1, 3);
    assert!(
        done.iter().all(|d| d.status == Status::CONTROLLER_FAILED),
        "{done:?}"
    );
    assert!(c.is_failed());
    let r = c.submit(1, IoRequest::contiguous(9, 1, IoOp::Read, 0, 1, p, 512));
    assert_eq!(r.map_err(|x| x.error), Err(NvmeError::Failed));
    assert_eq!(c.outstanding(1), 0);
}
