//! The table: results, targets, notes.

use std::fmt::Write as _;
use std::time::Duration;

use crate::paths::PathResult;
use crate::setup::machine;
use crate::tunnel::{Convergence, IdleMemory};
use crate::{Opts, Res};

// ---------------------------------------------------------------------------------------------
// Report

pub(crate) fn g(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2}"))
}

pub(crate) fn mb(v: Option<u64>) -> String {
    v.map_or("—".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn report(
    opts: &Opts,
    results: &[PathResult],
    idle: &Res<IdleMemory>,
    converge: &Res<Convergence>,
    notes: &[String],
    elapsed: Duration,
) -> (String, bool) {
    let mut s = String::new();
    let mode = if opts.smoke {
        "smoke (tiny sizes; figures mean nothing)"
    } else {
        "full"
    };
    let _ = writeln!(s, "## Results ({mode})\n");
    let _ = writeln!(
        s,
        "Machine: {}. Run took {:.0} s; iperf3 {} s per run{}, {} × 64-byte round trips, setup ≤ {} dials or {:?}.\n",
        machine(),
        elapsed.as_secs_f64(),
        opts.secs,
        if opts.smoke { "" } else { " (+1 s omitted)" },
        opts.round_trips,
        opts.dials,
        opts.setup_time
    );
    let _ = writeln!(
        s,
        "| path | 1 stream up | 1 stream down | 8 streams up | 8 streams down | iperf3 1 up | iperf3 8 up | p50 µs | p99 µs | added p50 µs | setup /s | CPU s/GB | root side peak MiB | leaf side peak MiB |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let direct_p50 = results
        .iter()
        .find(|r| r.name == "direct TCP")
        .and_then(|r| r.latency.map(|l| l.0));
    for r in results {
        let added = r.latency.and_then(|l| direct_p50.map(|d| l.0 - d));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            g(r.bulk[0]),
            g(r.bulk[1]),
            g(r.bulk[2]),
            g(r.bulk[3]),
            g(r.iperf[0]),
            g(r.iperf[1]),
            r.latency.map_or("—".into(), |l| format!("{:.0}", l.0)),
            r.latency.map_or("—".into(), |l| format!("{:.0}", l.1)),
            added.map_or("—".into(), |a| format!("{a:.0}")),
            r.setup.map_or("—".into(), |v| format!("{v:.0}")),
            r.cpu_per_gb.map_or("—".into(), |v| format!("{v:.2}")),
            mb(r.server_peak),
            mb(r.agent_peak),
        );
    }
    match converge {
        Ok(c) => {
            let _ = writeln!(
                s,
                "\nOne agent → all 5 proxies behind haproxy (`balance random`), {} fresh agent processes: \
                 5/5 tunnels after {:.0} ms median, {:.0} ms at most; {} dials median, {} at most.",
                c.runs, c.median_ms, c.max_ms, c.median_attempts, c.max_attempts
            );
        }
        Err(e) => {
            let _ = writeln!(s, "\nOne agent → 5 proxies behind haproxy: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\nThroughput in Gbit/s, counted where the bytes arrive. The first four columns use the benchmark's own client and server (128 KiB writes; Tether's client speaks HTTP CONNECT to the proxy's entry, as curl does); the iperf3 columns reach Tether through `tether forward`, one more local TCP hop. \"Up\" is root-side client → leaf-side server. CPU s/GB: CPU time (user + system) of the path's own processes (proxy and agent, sshd and ssh, ...) per GB moved in the four bulk runs, the cost that matters when cores are shared. Peaks are VmHWM summed over each side's processes (sshd: master and session processes), read after the 8-stream runs. Direct TCP and haproxy have no leaf side.\n"
    );
    for r in results {
        if !r.note.is_empty() {
            let _ = writeln!(s, "- {}: {}", r.name, r.note);
        }
        for e in &r.errors {
            let _ = writeln!(
                s,
                "- {}: **not measured**: {}",
                r.name,
                e.replace('\n', " ")
            );
        }
    }
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    let _ = writeln!(s, "\n### Idle memory on the proxy\n");
    match idle {
        Ok(m) => {
            let _ = writeln!(
                s,
                "| what | count | per item on the proxy (KiB) |\n| --- | ---: | ---: |"
            );
            let _ = writeln!(
                s,
                "| idle agent tunnels (one process, one identity) | {} | {:.1} |",
                m.agents, m.per_tunnel_kib
            );
            let _ = writeln!(
                s,
                "| idle open streams (HTTP CONNECT → echo server) | {} | {:.1} |",
                m.streams, m.per_stream_kib
            );
            let _ = writeln!(
                s,
                "\nProxy VmRSS before any agent: {:.1} MiB. Agent side (all agents in the benchmark process): {:.1} KiB per tunnel.",
                m.base_kib as f64 / 1024.0,
                m.agent_side_per_tunnel_kib
            );
        }
        Err(e) => {
            let _ = writeln!(s, "not measured: {e}");
        }
    }
    // Targets.
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let tether = find("tether");
    let gcm = find("ssh -R aes128-gcm");
    let mut moved = true;
    if !opts.smoke {
        let _ = writeln!(s, "\n### Targets (ratios from this run)\n");
        let _ = writeln!(s, "| target | measured | met |\n| --- | --- | --- |");
        let mut row = |what: &str, measured: String, ok: Option<bool>| {
            let _ = writeln!(
                s,
                "| {what} | {measured} | {} |",
                match ok {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            );
        };
        for (label, idx) in [
            ("one stream ≥ 1.5× OpenSSH aes128-gcm", [0usize, 1]),
            ("8 streams ≥ 1.5× OpenSSH aes128-gcm", [2, 3]),
        ] {
            let rs: Vec<Option<f64>> = idx
                .iter()
                .map(|&i| ratio(tether.and_then(|t| t.bulk[i]), gcm.and_then(|o| o.bulk[i])))
                .collect();
            let ok = rs
                .iter()
                .all(Option::is_some)
                .then(|| rs.iter().flatten().all(|r| *r >= 1.5));
            row(label, format!("up {}×, down {}×", g(rs[0]), g(rs[1])), ok);
        }
        let added = |r: Option<&PathResult>| {
            r.and_then(|r| r.latency)
                .and_then(|l| direct_p50.map(|d| l.0 - d))
        };
        let (ta, oa) = (added(tether), added(gcm));
        row(
            "added p50 latency ≤ OpenSSH's",
            format!(
                "{} µs vs {} µs",
                ta.map_or("—".into(), |v| format!("{v:.0}")),
                oa.map_or("—".into(), |v| format!("{v:.0}"))
            ),
            ta.zip(oa).map(|(t, o)| t <= o),
        );
        let peak = tether.and_then(|t| t.server_peak);
        row(
            "proxy peak RSS under 8 streams ≤ 20 MB",
            format!("{} MiB", mb(peak)),
            peak.map(|k| (k as f64) * 1024.0 <= 20e6),
        );
        if let Ok(m) = idle {
            row(
                "≤ 64 KiB per idle agent tunnel",
                format!("{:.1} KiB", m.per_tunnel_kib),
                Some(m.per_tunnel_kib <= 64.0),
            );
            row(
                "≤ 16 KiB per idle open stream",
                format!("{:.1} KiB", m.per_stream_kib),
                Some(m.per_stream_kib <= 16.0),
            );
        }
        match converge {
            Ok(c) => row(
                "1 agent holds tunnels to 5 proxies behind haproxy within 2 s",
                format!(
                    "{:.0} ms median, {:.0} ms max ({} dials max)",
                    c.median_ms, c.max_ms, c.max_attempts
                ),
                Some(c.max_ms <= 2000.0),
            ),
            Err(e) => row(
                "1 agent holds tunnels to 5 proxies behind haproxy within 2 s",
                e.clone(),
                None,
            ),
        }
    } else {
        // Smoke: every path that ran must have moved bytes; Tether must have run.
        for r in results {
            let ok = r.bulk.iter().chain(&r.iperf).all(Option::is_some)
                && r.latency.is_some()
                && r.setup.is_some();
            if !ok {
                moved = false;
                let _ = writeln!(
                    s,
                    "\nSMOKE FAILURE: {} did not move bytes on every workload",
                    r.name
                );
            }
        }
        if tether.is_none() || idle.is_err() {
            moved = false;
            let _ = writeln!(s, "\nSMOKE FAILURE: Tether's rows or idle memory missing");
        }
    }
    (s, moved)
}
