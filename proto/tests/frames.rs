//! Property tests of the channel: round trips, single-bit corruption, truncation, replay, resync and bounds.

use proptest::prelude::*;
use proto::*;

fn name() -> impl Strategy<Value = Name> {
    "[a-z0-9-]{0,32}".prop_map(|s| truncated::<32>(&s))
}

fn vcpu_tel() -> impl Strategy<Value = VcpuTelemetry> {
    (any::<u16>(), any::<[u64; 8]>(), any::<i64>(), any::<bool>()).prop_map(
        |(vcpu, v, balance_ns, unlimited)| VcpuTelemetry {
            vcpu,
            baseline_ns: v[0],
            burst_ns: v[1],
            earned_ns: v[2],
            spent_ns: v[3],
            discarded_ns: v[4],
            granted_ns: v[5],
            balance_ns,
            throttled_ns: v[6],
            wake_latency_max_ns: v[7],
            unlimited,
        },
    )
}

fn vol_tel() -> impl Strategy<Value = VolumeTelemetry> {
    (any::<u16>(), any::<[u32; 4]>(), any::<[u64; 2]>()).prop_map(|(volume, a, l)| {
        VolumeTelemetry {
            volume,
            iops: a[0],
            committed_iops: a[1],
            limit_iops: a[2],
            latency_p50_ns: l[0],
            latency_p99_ns: l[1],
            throttled: a[3],
        }
    })
}

fn hv<T: Clone + core::fmt::Debug, const N: usize>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = heapless::Vec<T, N>> {
    proptest::collection::vec(s, 0..=N).prop_map(|v| v.into_iter().collect())
}

fn instruction() -> impl Strategy<Value = Instruction> {
    prop_oneof![
        Just(Instruction::Now),
        any::<u64>().prop_map(|per_period_ns| Instruction::Rate { per_period_ns }),
        Just(Instruction::AfterEvent(Event::MigrationComplete)),
    ]
}

fn params() -> impl Strategy<Value = SchedParams> {
    (any::<[u64; 4]>(), any::<bool>(), any::<u16>()).prop_map(|(v, u, weight)| SchedParams {
        budget_ns: v[0],
        period_ns: v[1],
        accrual_ns: v[2],
        cap_ns: v[3],
        burst: if u {
            BurstMode::Unlimited
        } else {
            BurstMode::Standard
        },
        weight,
    })
}

fn to_agent() -> impl Strategy<Value = ToAgent> {
    prop_oneof![
        (name(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(host_id, boot_id, capabilities, p)| {
                ToAgent::Hello(Hello {
                    host_id,
                    boot_id,
                    version: PROTOCOL_VERSION,
                    capabilities,
                    telemetry_period_ms: p,
                })
            }
        ),
        (
            any::<[u64; 3]>(),
            any::<u32>(),
            hv::<_, MAX_VCPUS>(vcpu_tel()),
            hv::<_, MAX_VOLUMES>(vol_tel())
        )
            .prop_map(|(t, vm, vcpus, volumes)| ToAgent::Telemetry(VmTelemetry {
                seq: t[0],
                time_ns: t[1],
                window_ns: t[2],
                vm,
                vcpus,
                volumes
            })),
        (
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            any::<u16>(),
            any::<u64>(),
            any::<i64>()
        )
            .prop_map(|(request_id, io, vm, unit, amount_ns, balance_ns)| {
                ToAgent::CreditRequest(CreditRequest {
                    request_id,
                    resource: if io { Resource::Io } else { Resource::Cpu },
                    vm,
                    unit,
                    amount_ns,
                    balance_ns,
                })
            }),
        (
            any::<u64>(),
            hv::<_, MAX_VMS>((any::<u32>(), name(), any::<u16>())),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, vms, next)| ToAgent::Response(Response {
                id,
                result: Ok(Reply::VmPage {
                    vms: vms
                        .into_iter()
                        .map(|(vm, name, vcpus)| VmSummary {
                            vm,
                            name,
                            state: VmState::Paused,
                            vcpus,
                        })
                        .collect(),
                    next,
                }),
            })),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<[u64; 2]>()).prop_map(
            |(id, grant_id, duplicate, a)| {
                ToAgent::Response(Response {
                    id,
                    result: Ok(Reply::GrantApplied {
                        grant_id,
                        duplicate,
                        applied_now_ns: a[0],
                        pending_ns: a[1],
                    }),
                })
            }
        ),
        (any::<u64>(), "[ -~]{0,120}").prop_map(|(id, r)| ToAgent::Response(Response {
            id,
            result: Err(CommandError::new(ErrorCode::Admission, &r))
        })),
        any::<[u64; 14]>().prop_map(|c| ToAgent::LinkStats(LinkStats {
            decode: DecodeStats {
                ok: c[0],
                oversized: c[1],
                cobs_errors: c[2],
                truncated: c[3],
                crc_errors: c[4],
                bad_version: c[5],
                malformed: c[6],
                replays: c[7],
                sessions: c[8],
            },
            rx_overruns: c[9],
            tx_dropped: c[10],
            executed: c[11],
            duplicates: c[12],
            stale: c[13],
        })),
        any::<[u64; 3]>().prop_map(|c| ToAgent::VmDestroyed(VmDestroyed {
            vm: u32::try_from(c[0] >> 32).unwrap_or(u32::MAX),
            last_seq: c[1],
            time_ns: c[2],
        })),
        (
            any::<u64>(),
            any::<u32>(),
            any::<[u16; 2]>(),
            proptest::collection::vec(any::<u8>(), 0..=PART_BYTES)
        )
            .prop_map(
                |(id, digest, at, bytes)| ToAgent::ResponsePart(ResponsePart {
                    id,
                    digest,
                    index: at[0],
                    count: at[1],
                    bytes: heapless::Vec::from_slice(&bytes).unwrap_or_default(),
                })
            ),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u32>(), any::<u16>(), any::<i64>()), 0..=MAX_VMS),
            any::<Option<(u32, u16)>>()
        )
            .prop_map(|(id, bs, next)| ToAgent::Response(Response {
                id,
                result: Ok(Reply::BalancePage {
                    balances: bs
                        .into_iter()
                        .map(|(vm, vcpu, b)| VcpuBalance {
                            vm,
                            vcpu,
                            balance_ns: b,
                            pending_ns: b.unsigned_abs(),
                            granted_total_ns: b.unsigned_abs() / 2,
                        })
                        .collect(),
                    next,
                }),
            })),
    ]
}

fn to_host() -> impl Strategy<Value = ToHost> {
    let cmd = prop_oneof![
        Just(Command::ListVms),
        any::<u32>().prop_map(|vm| Command::PauseVm { vm }),
        (name(), name(), hv::<_, MAX_VCPUS>(params())).prop_map(|(module, name, vcpus)| {
            Command::CreateVm {
                module,
                name,
                vcpus,
            }
        }),
        (any::<u32>(), any::<u16>(), params())
            .prop_map(|(vm, vcpu, params)| Command::SetSchedParams { vm, vcpu, params }),
        (any::<u32>(), any::<u16>()).prop_map(|(vm, vcpu)| Command::ReadBalancesFrom { vm, vcpu }),
        any::<u32>().prop_map(|capabilities| Command::AgentHello { capabilities }),
        "[ -~\n]{0,1024}".prop_map(|t| Command::CreateVmConfig {
            config: truncated(&t)
        }),
        (any::<u32>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(vm, volume, c, l)| {
            Command::SetVolumeCommitment {
                vm,
                volume,
                committed_iops: c,
                limit_iops: l,
            }
        }),
        (
            any::<[u64; 2]>(),
            any::<u32>(),
            any::<u16>(),
            hv::<_, MAX_STAGES>((any::<u64>(), instruction()))
        )
            .prop_map(|(ids, vm, unit, st)| Command::ApplyGrant(Grant {
                grant_id: ids[0],
                credit_request_id: ids[1],
                resource: Resource::Cpu,
                vm,
                unit,
                stages: st
                    .into_iter()
                    .map(|(amount_ns, instruction)| Stage {
                        amount_ns,
                        instruction
                    })
                    .collect(),
            })),
        proptest::option::of(any::<u32>()).prop_map(|vm| Command::ReadBalances { vm }),
        any::<u32>().prop_map(|first| Command::ListVmsFrom { first }),
    ];
    (any::<u64>(), cmd).prop_map(|(id, command)| ToHost::Request(Request { id, command }))
}

/// Encodes one frame into a vector (the std-only `encode_vec` is not compiled for this no_std test build).
fn ev<T: serde::Serialize>(enc: &mut FrameEncoder, m: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; MAX_WIRE];
    let n = enc.encode(m, &mut out)?;
    out.truncate(n);
    Ok(out)
}

fn decode_all<T: serde::de::DeserializeOwned>(dec: &mut FrameDecoder, bytes: &[u8]) -> Vec<T> {
    let mut out = Vec::new();
    dec.push_slice::<T>(bytes, |f| out.push(f.msg));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_to_agent(msgs in proptest::collection::vec(to_agent(), 1..6), session in any::<u32>()) {
        let mut enc = FrameEncoder::new(session, 1);
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(ev(&mut enc, m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        prop_assert_eq!(decode_all::<ToAgent>(&mut dec, &wire), msgs);
        prop_assert_eq!(dec.stats().rejected(), 0);
    }

    #[test]
    fn round_trip_to_host(msgs in proptest::collection::vec(to_host(), 1..6)) {
        let mut enc = FrameEncoder::new(7, 100);
        let wire: Vec<u8> = msgs.iter().flat_map(|m| ev(&mut enc, m).unwrap()).collect();
        let mut dec = FrameDecoder::new();
        prop_assert_eq!(decode_all::<ToHost>(&mut dec, &wire), msgs);
    }

    /// Flipping any single bit of a frame never yields a different valid message, and the stream resyncs so
    /// the next frame is delivered.
    #[test]
    fn single_bit_flip_never_yields_another_message(m in to_host(), next in to_host()) {
        let mut enc = FrameEncoder::new(1, 1);
        let frame = ev(&mut enc, &m).unwrap();
        let follow = ev(&mut enc, &next).unwrap();
        for bit in 0..frame.len() * 8 {
            let mut bad = frame.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            bad.extend_from_slice(&follow);
            let mut dec = FrameDecoder::new();
            let got = decode_all::<ToHost>(&mut dec, &bad);
            for g in &got {
                prop_assert!(g == &m || g == &next, "bit {} produced a foreign message {:?}", bit, g);
            }
            prop_assert_eq!(got.last(), Some(&next), "bit {}: the next frame was lost", bit);
        }
    }

    /// Any truncation of a frame (followed by a delimiter) is dropped and counted.
    #[test]
    fn truncated_frames_are_dropped(m in to_agent()) {
        let mut enc = FrameEncoder::new(1, 1);
        let frame = ev(&mut enc, &m).unwrap();
        // frame = 0 <cobs> 0; cut inside the cobs bytes.
        for cut in 2..frame.len() - 1 {
            let mut bad = frame[..cut].to_vec();
            bad.push(0);
            let mut dec = FrameDecoder::new();
            let got = decode_all::<ToAgent>(&mut dec, &bad);
            prop_assert!(got.is_empty(), "cut at {} decoded {:?}", cut, got);
            prop_assert_eq!(dec.stats().rejected(), 1);
        }
    }

    /// Arbitrary bytes never panic the decoder, and a valid frame after them is still delivered.
    #[test]
    fn garbage_then_frame_resyncs(noise in proptest::collection::vec(any::<u8>(), 0..5000), m in to_agent()) {
        let mut dec = FrameDecoder::new();
        let _ = decode_all::<ToAgent>(&mut dec, &noise);
        let mut enc = FrameEncoder::new(99, 1);
        let got = decode_all::<ToAgent>(&mut dec, &ev(&mut enc, &m).unwrap());
        prop_assert_eq!(got, vec![m]);
    }
}

#[test]
fn replayed_frame_is_dropped_and_counted() {
    let mut enc = FrameEncoder::new(3, 1);
    let a = ev(
        &mut enc,
        &ToHost::Request(Request {
            id: 1,
            command: Command::ListVms,
        }),
    )
    .unwrap();
    let b = ev(
        &mut enc,
        &ToHost::Request(Request {
            id: 2,
            command: Command::ListVms,
        }),
    )
    .unwrap();
    let mut dec = FrameDecoder::new();
    let mut wire = a.clone();
    wire.extend(&b);
    wire.extend(&a);
    wire.extend(&b);
    let got = decode_all::<ToHost>(&mut dec, &wire);
    assert_eq!(got.len(), 2);
    assert_eq!(dec.stats().replays, 2);
    // A new sender session (restart) is accepted.
    let mut enc2 = FrameEncoder::new(4, 1);
    let c = ev(
        &mut enc2,
        &ToHost::Request(Request {
            id: 3,
            command: Command::ListVms,
        }),
    )
    .unwrap();
    assert_eq!(decode_all::<ToHost>(&mut dec, &c).len(), 1);
    assert_eq!(dec.stats().sessions, 2);
}

#[test]
fn oversized_run_is_dropped_then_resyncs() {
    let mut dec = FrameDecoder::new();
    let junk = vec![0x55u8; MAX_ENCODED * 3];
    assert!(decode_all::<ToHost>(&mut dec, &junk).is_empty());
    let mut enc = FrameEncoder::new(1, 1);
    let m = ToHost::Request(Request {
        id: 9,
        command: Command::ListVms,
    });
    assert_eq!(
        decode_all::<ToHost>(&mut dec, &ev(&mut enc, &m).unwrap()),
        vec![m]
    );
    assert_eq!(dec.stats().oversized, 1);
}

#[test]
fn wrong_type_is_malformed_not_misread() {
    // A ToAgent frame fed to a ToHost decoder must not decode into some command.
    let mut enc = FrameEncoder::new(1, 1);
    let hello = ToAgent::Hello(Hello {
        host_id: truncated("h"),
        boot_id: 1,
        version: PROTOCOL_VERSION,
        capabilities: 0,
        telemetry_period_ms: 100,
    });
    let mut dec = FrameDecoder::new();
    let _ = decode_all::<ToHost>(&mut dec, &ev(&mut enc, &hello).unwrap());
    assert_eq!(dec.stats().ok + dec.stats().malformed, 1);
}

/// The largest messages fit MAX_PAYLOAD, so the kernel's fixed buffers suffice.
#[test]
fn largest_messages_fit() {
    let big = u64::MAX;
    let vt = VcpuTelemetry {
        vcpu: u16::MAX,
        baseline_ns: big,
        burst_ns: big,
        earned_ns: big,
        spent_ns: big,
        discarded_ns: big,
        granted_ns: big,
        balance_ns: i64::MIN,
        throttled_ns: big,
        wake_latency_max_ns: big,
        unlimited: true,
    };
    let vol = VolumeTelemetry {
        volume: u16::MAX,
        iops: u32::MAX,
        committed_iops: u32::MAX,
        limit_iops: u32::MAX,
        latency_p50_ns: big,
        latency_p99_ns: big,
        throttled: u32::MAX,
    };
    let tel = ToAgent::Telemetry(VmTelemetry {
        seq: big,
        time_ns: big,
        window_ns: big,
        vm: u32::MAX,
        vcpus: core::iter::repeat_n(vt, MAX_VCPUS).collect(),
        volumes: core::iter::repeat_n(vol, MAX_VOLUMES).collect(),
    });
    let long: Name = truncated(&"x".repeat(64));
    let p = SchedParams {
        budget_ns: big,
        period_ns: big,
        accrual_ns: big,
        cap_ns: big,
        burst: BurstMode::Unlimited,
        weight: u16::MAX,
    };
    let summary = VmSummary {
        vm: u32::MAX,
        name: long.clone(),
        state: VmState::Destroyed,
        vcpus: u16::MAX,
    };
    let list = ToAgent::Response(Response {
        id: big,
        result: Ok(Reply::VmList(
            core::iter::repeat_n(summary.clone(), MAX_VMS).collect(),
        )),
    });
    let info = ToAgent::Response(Response {
        id: big,
        result: Ok(Reply::VmInfo(VmInfo {
            summary,
            module: long.clone(),
            vcpus: core::iter::repeat_n(p, MAX_VCPUS).collect(),
            volumes: core::iter::repeat_n(
                VolumeInfo {
                    volume: u16::MAX,
                    committed_iops: u32::MAX,
                    limit_iops: u32::MAX,
                },
                MAX_VOLUMES,
            )
            .collect(),
        })),
    });
    let bal = VcpuBalance {
        vm: u32::MAX,
        vcpu: u16::MAX,
        balance_ns: i64::MIN,
        pending_ns: big,
        granted_total_ns: big,
    };
    let bals = ToAgent::Response(Response {
        id: big,
        result: Ok(Reply::Balances(
            core::iter::repeat_n(bal, MAX_VMS).collect(),
        )),
    });
    let create = ToHost::Request(Request {
        id: big,
        command: Command::CreateVm {
            module: long.clone(),
            name: long,
            vcpus: core::iter::repeat_n(p, MAX_VCPUS).collect(),
        },
    });
    let mut enc = FrameEncoder::new(u32::MAX, u64::MAX - 10);
    let link = ToAgent::LinkStats(LinkStats {
        decode: DecodeStats {
            ok: big,
            oversized: big,
            cobs_errors: big,
            truncated: big,
            crc_errors: big,
            bad_version: big,
            malformed: big,
            replays: big,
            sessions: big,
        },
        rx_overruns: big,
        tx_dropped: big,
        executed: big,
        duplicates: big,
        stale: big,
    });
    let gone = ToAgent::VmDestroyed(VmDestroyed {
        vm: u32::MAX,
        last_seq: big,
        time_ns: big,
    });
    let page = ToAgent::Response(Response {
        id: big,
        result: Ok(Reply::VmPage {
            vms: core::iter::repeat_n(summary_max(u32::MAX), MAX_VMS).collect(),
            next: Some(u32::MAX),
        }),
    });
    let from = ToHost::Request(Request {
        id: big,
        command: Command::ListVmsFrom { first: u32::MAX },
    });
    assert!(ev(&mut enc, &from).unwrap().len() <= MAX_WIRE);
    for m in [tel, list, info, bals, link, gone, page] {
        let n = ev(&mut enc, &m).unwrap().len();
        assert!(n <= MAX_WIRE, "{n}");
    }
    assert!(ev(&mut enc, &create).unwrap().len() <= MAX_WIRE);
    // The largest configuration text (multi-byte characters: the bound is in bytes).
    let text: heapless::String<MAX_CONFIG_TEXT> = truncated(&"\u{00e9}".repeat(MAX_CONFIG_TEXT));
    assert!(text.len() > MAX_CONFIG_TEXT - 2);
    let create_cfg = ToHost::Request(Request {
        id: big,
        command: Command::CreateVmConfig { config: text },
    });
    assert!(ev(&mut enc, &create_cfg).unwrap().len() <= MAX_WIRE);
}

/// A summary as large as the wire allows (longest name, largest counts) for VM `vm`.
fn summary_max(vm: VmId) -> VmSummary {
    VmSummary {
        vm,
        name: truncated(&"\u{00e9}".repeat(16)),
        state: VmState::Destroyed,
        vcpus: u16::MAX,
    }
}

/// Reads a host's whole VM table the way the agent does (`ListVmsFrom` from 0, then `next`), every page
/// through a real frame; returns the VMs and the number of pages.
fn list_through_frames(host: &[VmSummary]) -> (Vec<VmSummary>, usize) {
    let mut enc = FrameEncoder::new(3, 1);
    let mut dec = FrameDecoder::new();
    let mut all = Vec::new();
    let mut first = 0;
    for pages in 1..=host.len() + 1 {
        let reply = vm_page(host.iter().cloned(), first);
        let wire = ev(
            &mut enc,
            &ToAgent::Response(Response {
                id: 1,
                result: Ok(reply),
            }),
        )
        .expect("a page fits one frame");
        assert!(wire.len() <= MAX_WIRE);
        let got: Vec<ToAgent> = decode_all(&mut dec, &wire);
        let [ToAgent::Response(Response {
            result: Ok(Reply::VmPage { vms, next }),
            ..
        })] = got.as_slice()
        else {
            panic!("one page expected, got {got:?}");
        };
        assert!(vms.len() <= MAX_VMS);
        all.extend(vms.iter().cloned());
        match next {
            Some(n) => {
                assert!(*n > first, "the listing progresses");
                first = *n;
            }
            None => return (all, pages),
        }
    }
    panic!("the listing of {} VMs did not end", host.len());
}

/// A host at its maximum (the kernel's 64-VM table, every summary as large as the wire allows) is listed
/// completely and in order, in `MAX_HOST_VMS / MAX_VMS` pages of one frame each.
#[test]
fn vm_listing_of_a_full_host_is_complete() {
    let host: Vec<VmSummary> = (0..u32::try_from(MAX_HOST_VMS).unwrap())
        .map(summary_max)
        .collect();
    let (all, pages) = list_through_frames(&host);
    assert_eq!(all, host);
    assert_eq!(pages, MAX_HOST_VMS.div_ceil(MAX_VMS));
    // The single-reply list keeps its first-page meaning.
    let Reply::VmPage { vms, next } = vm_page(host.iter().cloned(), 0) else {
        unreachable!()
    };
    assert_eq!(vms.len(), MAX_VMS);
    assert_eq!(next, Some(u32::try_from(MAX_VMS).unwrap()));
}

/// Paging edges: an empty host, one VM short of and one past a page, sparse ids, a start past the end.
#[test]
fn vm_listing_edges() {
    for n in [0, 1, MAX_VMS - 1, MAX_VMS, MAX_VMS + 1, MAX_HOST_VMS] {
        let host: Vec<VmSummary> = (0..u32::try_from(n).unwrap()).map(summary_max).collect();
        let (all, pages) = list_through_frames(&host);
        assert_eq!(all, host, "{n} VMs");
        assert_eq!(pages, n.div_ceil(MAX_VMS).max(1), "{n} VMs");
    }
    // Ids need not be dense (a host may number its VMs sparsely): the page starts at the first id >= first.
    let sparse: Vec<VmSummary> = (0..70u32).map(|i| summary_max(i * 1000 + 7)).collect();
    let (all, pages) = list_through_frames(&sparse);
    assert_eq!(all, sparse);
    assert_eq!(pages, 3);
    let Reply::VmPage { vms, next } = vm_page(sparse.iter().cloned(), 32_008) else {
        unreachable!()
    };
    assert_eq!(vms.first().map(|v| v.vm), Some(33_007));
    assert_eq!(next, Some(65_007));
    assert_eq!(
        vm_page(sparse.iter().cloned(), u32::MAX),
        Reply::VmPage {
            vms: heapless::Vec::new(),
            next: None
        }
    );
}

/// A balance of vCPU `vcpu` of VM `vm` with large values (the largest encoding).
fn big_balance(vm: u32, vcpu: u16) -> VcpuBalance {
    VcpuBalance {
        vm,
        vcpu,
        balance_ns: i64::MIN,
        pending_ns: u64::MAX,
        granted_total_ns: u64::MAX,
    }
}

/// `ReadBalancesFrom` pages: a full host (256 vCPUs, given in any order) is read completely, each vCPU once and in
/// (vm, vcpu) order, from any start; the largest page fits the wire.
#[test]
fn balance_pages_cover_a_full_host() {
    let mut host: Vec<VcpuBalance> = (0..64u32)
        .flat_map(|vm| (0..4u16).map(move |c| big_balance(vm * 3, c)))
        .collect();
    // Any order in, sorted out: the list starts in the middle of a VM.
    host.rotate_left(77);
    let mut want: Vec<(u32, u16)> = host.iter().map(|b| (b.vm, b.vcpu)).collect();
    want.sort_unstable();
    for n in [0usize, 1, 31, 32, 33, 64, 256] {
        let some = &host[..n];
        let mut want_n: Vec<(u32, u16)> = some.iter().map(|b| (b.vm, b.vcpu)).collect();
        want_n.sort_unstable();
        let (mut got, mut from, mut pages) = (Vec::new(), (0u32, 0u16), 0);
        loop {
            let Reply::BalancePage { balances, next } =
                balance_page(some.iter().cloned(), from.0, from.1)
            else {
                panic!("a page");
            };
            pages += 1;
            assert!(balances.len() <= MAX_VMS);
            got.extend(balances.iter().map(|b| (b.vm, b.vcpu)));
            let mut enc = FrameEncoder::new(1, 1);
            let wire = enc
                .encode_vec(&ToAgent::Response(Response {
                    id: u64::MAX,
                    result: Ok(Reply::BalancePage { balances, next }),
                }))
                .unwrap();
            assert!(wire.len() <= MAX_WIRE);
            match next {
                Some(n) => {
                    assert!(n > from, "pages move forward");
                    from = n;
                }
                None => break,
            }
        }
        assert_eq!(got, want_n, "{n} vCPUs");
        assert_eq!(pages, n.div_ceil(MAX_VMS).max(1), "{n} vCPUs");
    }
    // From the middle of a VM, and past the end.
    let Reply::BalancePage { balances, next } = balance_page(host.iter().cloned(), 3, 2) else {
        panic!("a page");
    };
    assert_eq!((balances[0].vm, balances[0].vcpu), (3, 2));
    assert_eq!(
        next,
        Some(want[want.iter().position(|k| *k == (3, 2)).unwrap() + MAX_VMS])
    );
    let Reply::BalancePage { balances, next } = balance_page(host.iter().cloned(), u32::MAX, 0)
    else {
        panic!("a page");
    };
    assert!(balances.is_empty() && next.is_none());
}

/// A peer of another protocol version: its intact frames are refused (`bad_version`) and its version is named
/// by `foreign_version`; corrupt frames never set it, and frames of our version are still delivered.
#[test]
fn foreign_version_is_reported_not_delivered() {
    let hello = ToAgent::Hello(Hello {
        host_id: truncated("h"),
        boot_id: 7,
        version: PROTOCOL_VERSION + 1,
        capabilities: 0,
        telemetry_period_ms: 0,
    });
    let mut dec = FrameDecoder::new();
    let mut corrupt = FrameEncoder::with_version(1, 1, PROTOCOL_VERSION + 1)
        .encode_vec(&hello)
        .unwrap();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let mut got = 0;
    dec.push_slice::<ToAgent>(&corrupt, |_| got += 1);
    assert_eq!(
        dec.foreign_version(),
        None,
        "a corrupt frame proves nothing"
    );
    let foreign = FrameEncoder::with_version(2, 1, PROTOCOL_VERSION + 1)
        .encode_vec(&hello)
        .unwrap();
    dec.push_slice::<ToAgent>(&foreign, |_| got += 1);
    assert_eq!(got, 0);
    assert_eq!(dec.stats().bad_version, 1);
    assert_eq!(dec.foreign_version(), Some(PROTOCOL_VERSION + 1));
    let ours = FrameEncoder::new(3, 1).encode_vec(&hello).unwrap();
    dec.push_slice::<ToAgent>(&ours, |_| got += 1);
    assert_eq!(got, 1);
}
