//! ipvsadm's `--save` text: what `service save` prints and `service restore` reads, so tables
//! move between Bulkhead and IPVS (`ipvsadm -S -n`, `ipvsadm -R`) as text.

use std::{collections::HashMap, net::Ipv4Addr};

use super::{
    Result, ServiceTableError,
    model::{BackendSpec, SchedFlags, Scheduler, ServiceSpec, VirtualAddr},
    parse_err,
};

/// `specs` in `--save` format: one `-A` line per service, then an `-a` line per backend.
pub fn format(specs: &[ServiceSpec]) -> String {
    let mut out = String::new();
    for spec in specs {
        let v = spec.vaddr;
        let flag = v.proto.ipvsadm_flag();
        out.push_str(&format!(
            "-A {flag} {}:{} -s {}",
            v.addr,
            v.port,
            spec.scheduler.name()
        ));
        if spec.affinity_secs != 0 {
            out.push_str(&format!(" -p {}", spec.affinity_secs));
            // As ipvsadm -S: the netmask only with persistence, and only when not /32.
            if spec.affinity_netmask != Ipv4Addr::BROADCAST {
                out.push_str(&format!(" -M {}", spec.affinity_netmask));
            }
        }
        if !spec.sched_flags.is_empty() {
            out.push_str(&format!(
                " -b {}",
                spec.sched_flags.canonical(spec.scheduler)
            ));
        }
        if let Some(port) = spec.nodeport {
            // Not an ipvsadm flag: IPVS has no NodePort; Bulkhead's restore reads it.
            out.push_str(&format!(" --nodeport {port}"));
        }
        out.push('\n');
        for b in &spec.backends {
            out.push_str(&format!(
                "-a {flag} {}:{} -r {} -m -w {}\n",
                v.addr, v.port, b.addr, b.weight
            ));
        }
    }
    out
}

/// Parses ipvsadm `--save` text into service specs, with their line numbers.
pub fn parse(text: &str) -> Result<(bool, Vec<(usize, ServiceSpec)>)> {
    let mut clear = false;
    let mut specs: Vec<(usize, ServiceSpec)> = Vec::new();
    let mut index: HashMap<VirtualAddr, usize> = HashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let wrap = |e| ServiceTableError::Restore {
            line,
            source: Box::new(e),
        };
        let words: Vec<&str> = raw
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let Some((&cmd, rest)) = words.split_first() else {
            continue;
        };
        let opts = Options::parse(rest).map_err(wrap)?;
        opts.only_supported(cmd).map_err(wrap)?;
        match cmd {
            "-C" | "--clear" => clear = true,
            "-A" | "--add-service" => {
                let vaddr = opts.service().map_err(wrap)?;
                if index.contains_key(&vaddr) {
                    return Err(wrap(ServiceTableError::Duplicate { service: vaddr }));
                }
                let scheduler = match opts.get(&["-s", "--scheduler"]) {
                    Some(s) => s.parse().map_err(wrap)?,
                    None => Scheduler::default(),
                };
                let affinity_secs = match opts.get(&["-p", "--persistent"]) {
                    Some(p) => p.parse().map_err(|_| {
                        wrap(parse_err("persistence timeout", p, "expected seconds"))
                    })?,
                    None => 0,
                };
                let affinity_netmask = match opts.get(&["-M", "--netmask"]) {
                    Some(m) => m.parse().map_err(|_| {
                        wrap(parse_err(
                            "persistence netmask",
                            m,
                            "expected a dotted-quad IPv4 netmask",
                        ))
                    })?,
                    None => Ipv4Addr::BROADCAST,
                };
                let sched_flags = match opts.get(&["-b", "--sched-flags"]) {
                    Some(f) => SchedFlags::parse(f, scheduler).map_err(wrap)?,
                    None => SchedFlags::default(),
                };
                let nodeport = match opts.get(&["--nodeport"]) {
                    Some(p) => Some(
                        p.parse()
                            .map_err(|_| wrap(parse_err("node port", p, "expected 1..=65535")))?,
                    ),
                    None => None,
                };
                index.insert(vaddr, specs.len());
                specs.push((
                    line,
                    ServiceSpec {
                        vaddr,
                        scheduler,
                        affinity_secs,
                        affinity_netmask,
                        sched_flags,
                        nodeport,
                        backends: Vec::new(),
                    },
                ));
            }
            "-a" | "--add-server" => {
                let vaddr = opts.service().map_err(wrap)?;
                let i = *index
                    .get(&vaddr)
                    .ok_or_else(|| wrap(ServiceTableError::Unknown { service: vaddr }))?;
                let real = opts
                    .get(&["-r", "--real-server"])
                    .ok_or_else(|| wrap(parse_err("server line", raw, "missing -r ADDR:PORT")))?;
                let mut spec: BackendSpec = real.parse().map_err(wrap)?;
                if let Some(w) = opts.get(&["-w", "--weight"]) {
                    spec.weight = w
                        .parse()
                        .map_err(|_| wrap(parse_err("weight", w, "expected 0..=65535")))?;
                }
                specs[i].1.backends.push(spec);
            }
            other => return Err(wrap(parse_err("command", other, "expected -A, -a or -C"))),
        }
    }
    Ok((clear, specs))
}

/// Flags of one ipvsadm line: `-t ADDR:PORT -s rr -w 3 -m`.
struct Options<'a> {
    pairs: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Options<'a> {
    fn parse(words: &[&'a str]) -> Result<Self> {
        const SWITCHES: [&str; 8] = [
            "-m",
            "--masquerading",
            "-g",
            "--gatewaying",
            "-i",
            "--ipip",
            "-o",
            "--ops",
        ];
        let mut pairs = Vec::new();
        let mut it = words.iter();
        while let Some(&w) = it.next() {
            if SWITCHES.contains(&w) {
                pairs.push((w, None));
            } else {
                let v = it
                    .next()
                    .ok_or_else(|| parse_err("option", w, "missing its value"))?;
                pairs.push((w, Some(*v)));
            }
        }
        Ok(Options { pairs })
    }

    /// Refuses every option this table cannot keep, naming it: a restored table must come
    /// back from `save` exactly as it went in, never with an option silently dropped.
    fn only_supported(&self, cmd: &str) -> Result<()> {
        const SERVICE: [&str; 14] = [
            "-b",
            "--sched-flags",
            "-M",
            "--netmask",
            "-t",
            "--tcp-service",
            "-u",
            "--udp-service",
            "-s",
            "--scheduler",
            "-p",
            "--persistent",
            "--nodeport",
            "--",
        ];
        const SERVER: [&str; 9] = [
            "-t",
            "--tcp-service",
            "-u",
            "--udp-service",
            "-r",
            "--real-server",
            "-w",
            "--weight",
            "-m",
        ];
        let allowed: &[&str] = match cmd {
            "-A" | "--add-service" => &SERVICE,
            "-a" | "--add-server" => &SERVER,
            _ => return Ok(()),
        };
        for (name, _) in &self.pairs {
            if allowed.contains(name) || *name == "--masquerading" {
                continue;
            }
            let why = match *name {
                "-f" | "--fwmark-service" => "firewall-mark services are not supported yet",
                "-o" | "--ops" => "one-packet scheduling is not supported yet",
                "-x" | "--u-threshold" | "-y" | "--l-threshold" => {
                    "connection thresholds are not supported yet"
                }
                "--pe" => "persistence engines are not supported",
                "-g" | "--gatewaying" | "-i" | "--ipip" => {
                    "only masquerading (-m, NAT) is supported"
                }
                _ => "unknown option",
            };
            return Err(parse_err("option", name, why));
        }
        Ok(())
    }

    fn get(&self, names: &[&str]) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| names.contains(k))
            .and_then(|(_, v)| *v)
    }

    fn service(&self) -> Result<VirtualAddr> {
        if let Some(a) = self.get(&["-t", "--tcp-service"]) {
            return format!("{a}/tcp").parse();
        }
        if let Some(a) = self.get(&["-u", "--udp-service"]) {
            return format!("{a}/udp").parse();
        }
        Err(parse_err("service line", "", "missing -t or -u ADDR:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_reads_ipvsadm_save_output() {
        let text = "\
-A -t 198.19.0.10:80 -s wrr -p 300
-a -t 198.19.0.10:80 -r 198.18.0.2:8080 -m -w 1
-a -t 198.19.0.10:80 -r 198.18.0.3:8080 -m -w 2
-A -u 198.19.0.11:53 -s mh
-a -u 198.19.0.11:53 -r 198.18.0.4:53 -m -w 1
";
        let (clear, specs) = parse(text).unwrap();
        assert!(!clear);
        assert_eq!(specs.len(), 2);
        let (_, web) = &specs[0];
        assert_eq!(web.vaddr.to_string(), "198.19.0.10:80/tcp");
        assert_eq!(
            (web.scheduler, web.affinity_secs, web.backends.len()),
            (Scheduler::Wrr, 300, 2)
        );
        assert_eq!(web.backends[1].weight, 2);
        assert_eq!(specs[1].1.scheduler, Scheduler::Mh);

        let err = |text: &str, why: &str| {
            let e = parse(text).unwrap_err();
            let msg = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(msg.contains(why), "{text:?}: {msg}");
        };
        err("-a -t 198.19.0.10:80 -r 198.18.0.2:80\n", "no service");
        err("-A -t 198.19.0.10:80\n-A -t 198.19.0.10:80\n", "line 2");
        err(
            "-A -t 198.19.0.10:80\n-a -t 198.19.0.10:80 -r 198.18.0.2:80 -g\n",
            "masquerading",
        );
        err("-X\n", "expected -A");
        err("-A -t 198.19.9.4:80 -p 300 -M 255.255.255.x\n", "netmask");
        err("-A -t 198.19.9.4:80 -s rr -b sh-port\n", "incompatible");
        err("-A -t 198.19.9.4:80 -s sh -b sh-bogus\n", "scheduler flag");
        // Options a table could not keep are refused by name, never dropped.
        for (line, option) in [
            ("-A -f 10 -s rr", "\"-f\""),
            ("-A -u 198.19.9.4:53 -s rr -o", "\"-o\""),
            ("-A -t 198.19.9.4:80 --frobnicate 1", "unknown option"),
        ] {
            err(&format!("{line}\n"), option);
        }
        err(
            "-A -t 198.19.9.4:80\n-a -t 198.19.9.4:80 -r 198.18.0.2:80 -m -x 10\n",
            "thresholds",
        );
    }

    #[test]
    fn what_format_writes_parse_reads_back() {
        let text = "-A -t 198.19.0.10:80 -s rr -p 300 -M 255.255.255.0\n\
                    -a -t 198.19.0.10:80 -r 198.18.0.2:8080 -m -w 0\n\
                    -A -t 198.19.0.12:80 -s mh -b mh-fallback,mh-port\n\
                    -A -t 198.19.0.13:80 -s wrr -b flag-3\n\
                    -A -u 198.19.0.11:53 -s hash --nodeport 30053\n\
                    -a -u 198.19.0.11:53 -r 198.18.0.4:53 -m -w 7\n";
        let (_, specs) = parse(text).unwrap();
        let specs: Vec<ServiceSpec> = specs.into_iter().map(|(_, s)| s).collect();
        assert_eq!(format(&specs), text.replace("                    ", ""));
    }
}
