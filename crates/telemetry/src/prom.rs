//! Prometheus metrics for the three binaries, through `prometheus-client`: each binary
//! keeps a struct of typed metric families in a [`Registry`] (see [`new_registry`]) and
//! serves it with [`encode`] in the format the scraper asked for ([`Format::negotiate`]):
//! OpenMetrics 1.0.0, or the classic text format 0.0.4 derived from it.
//!
//! The pattern every binary follows (and metrics added later should too):
//!
//! ```
//! use netbore_telemetry::prom::{self, Format};
//! use prometheus_client::encoding::EncodeLabelSet;
//! use prometheus_client::metrics::{counter::Counter, family::Family};
//!
//! /// A label set: a struct whose fields are the labels (values from a fixed list;
//! /// `prometheus-client` does not escape quotes or backslashes in label values).
//! #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
//! struct Class {
//!     class: &'static str,
//! }
//!
//! let mut registry = prom::new_registry("example", "0.1.0");
//! let family = Family::<Class, Counter>::default();
//! // Counter names leave out `_total`: OpenMetrics adds it to the sample, and the
//! // classic text names the family with it.
//! prom::register(&mut registry, "example_responses", "Responses by class.", family.clone());
//! // Handles taken once: an increment is one atomic add, no lock, no lookup.
//! let ok = family.get_or_create_owned(&Class { class: "2xx" });
//! ok.inc();
//! let page = prom::encode(&registry, Format::Classic);
//! assert!(page.contains("# TYPE example_responses_total counter\n"));
//! assert!(page.contains("example_responses_total{class=\"2xx\"} 1\n"));
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of the classic text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4, what a scraper gets unless it asks for OpenMetrics.
    Classic,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when the header offers
    /// `application/openmetrics-text` (version 1.0.0 or unversioned) at a quality at
    /// least that of any text or wildcard type it also offers (Prometheus sends
    /// OpenMetrics first, at q=0.5 against text/plain's 0.3); the classic text otherwise,
    /// including with no header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Classic;
        };
        let (mut om, mut other) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let (mut q, mut version) = (1.0f32, None);
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(v.trim().trim_matches('"').to_string()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text"
                    if version.as_deref().is_none_or(|v| v == "1.0.0") =>
                {
                    om = om.max(q)
                }
                "text/plain" | "text/*" | "*/*" => other = other.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= other {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    /// The `Content-Type` a page in this format is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// The label set of `netbore_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

/// A registry holding what every binary serves: `netbore_build_info{component, version}`
/// (always 1) and the `process_*` families read from `/proc` at each scrape.
pub fn new_registry(component: &'static str, version: &'static str) -> Registry {
    let mut r = Registry::default();
    // An OpenMetrics info family: `netbore_build_info` on the page, a gauge in the
    // classic text.
    register(
        &mut r,
        "netbore_build",
        "Always 1; the labels name the component and its version.",
        Info::new(BuildLabels { component, version }),
    );
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// Registers a family with one series per value of `values`, all present from the
/// start (at 0), and returns their handles in that order.
pub fn labelled<L, M, const N: usize>(
    r: &mut Registry,
    name: &str,
    help: &str,
    values: [&'static str; N],
    label: impl Fn(&'static str) -> L,
) -> [M; N]
where
    L: Clone + std::hash::Hash + Eq + std::fmt::Debug + EncodeLabelSet + Send + Sync + 'static,
    M: TypedMetric + EncodeMetric + Default + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, M>::default();
    register(r, name, help, family.clone());
    values.map(|v| family.get_or_create_owned(&label(v)))
}

/// Registers one unlabelled metric and returns its handle.
pub fn single<M>(r: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Default + Clone,
{
    let m = M::default();
    register(r, name, help, m.clone());
    m
}

/// Registers `metric` with `help` as written (`prometheus-client` appends a full stop;
/// one already there is not doubled).
pub fn register(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    r.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

/// The page for `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> String {
    let mut om = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut om, registry);
    match format {
        Format::OpenMetrics => om,
        Format::Classic => to_classic(&om),
    }
}

/// The classic text format from OpenMetrics text as `prometheus-client` writes it: the
/// samples are the same; a counter family is named with its `_total` suffix, an info
/// family with `_info` and typed `gauge`; `# UNIT` and `# EOF` go.
fn to_classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A counter whose value is read from elsewhere at scrape time (e.g. summed over open
/// connections plus closed ones): [`SampledCounter::observe`] keeps the highest value
/// seen, so the page never shows it fall, even when a scrape races a connection moving
/// from the open sum to the closed one.
#[derive(Debug, Clone, Default)]
pub struct SampledCounter(Arc<AtomicU64>);

impl SampledCounter {
    /// Takes a fresh reading; returns the value the page will show.
    pub fn observe(&self, v: u64) -> u64 {
        self.0.fetch_max(v, Ordering::Relaxed).max(v)
    }

    /// The value the page shows.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for SampledCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for SampledCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A histogram of durations with fixed bucket bounds (seconds) and no lock:
/// [`DurationHistogram::observe`] is two atomic adds (`prometheus-client`'s own
/// histogram takes a write lock per observation).
#[derive(Debug, Clone)]
pub struct DurationHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one `+Inf`.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    /// A histogram with these upper bounds (ascending, seconds) plus `+Inf`.
    pub fn new(bounds: &'static [f64]) -> DurationHistogram {
        DurationHistogram(Arc::new(HistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.0.bounds.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(
            took.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The `process_*` families Prometheus client libraries serve, read from `/proc/self`
/// at each scrape (absent where `/proc` is not there).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    start_time_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        Self::parse(&stat, &status, &boot, &limits, open_fds, ticks)
    }

    fn parse(
        stat: &str,
        status: &str,
        boot: &str,
        limits: &str,
        open_fds: u64,
        ticks: f64,
    ) -> Option<ProcessStats> {
        // The command name (field 2) may hold spaces and parentheses: fields after
        // the last ')' are fixed. utime and stime are fields 14 and 15, starttime 22.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let cpu_seconds = (field(14)? + field(15)?) / ticks;
        let btime: f64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
                .map(|k| k * 1024)
        };
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok());
        Some(ProcessStats {
            cpu_seconds,
            start_time_seconds: btime + field(22)? / ticks,
            resident_bytes: kib("VmRSS:")?,
            virtual_bytes: kib("VmSize:")?,
            open_fds,
            max_fds,
        })
    }
}

/// Writes one gauge family with a single sample.
fn gauge<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug + 'static,
{
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            int(s.resident_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            int(s.virtual_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            int(s.open_fds),
        )?;
        if let Some(max) = s.max_fds {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                int(max),
            )?;
        }
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            s.start_time_seconds,
        )?;
        if let Some(h) = crate::memory::heap_stats() {
            for (name, help, v) in [
                (
                    "netbore_heap_allocated_bytes",
                    "Bytes in live heap allocations (jemalloc stats.allocated).",
                    h.allocated,
                ),
                (
                    "netbore_heap_active_bytes",
                    "Bytes in heap pages holding live allocations, rounding included (jemalloc stats.active).",
                    h.active,
                ),
                (
                    "netbore_heap_metadata_bytes",
                    "Bytes of the allocator's own bookkeeping (jemalloc stats.metadata).",
                    h.metadata,
                ),
                (
                    "netbore_heap_resident_bytes",
                    "Bytes of resident pages the allocator maps, freed pages not yet purged included (jemalloc stats.resident).",
                    h.resident,
                ),
            ] {
                gauge(&mut encoder, name, help, int(v))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Code {
        code: &'static str,
    }

    fn sample_registry() -> (Registry, Counter, DurationHistogram) {
        let mut r = Registry::default();
        let c = Counter::default();
        register(&mut r, "a", "A.", c.clone());
        let f = Family::<Code, Counter>::default();
        register(&mut r, "b", "B.", f.clone());
        f.get_or_create_owned(&Code { code: "x_y" }).inc_by(2);
        let g = Gauge::<i64>::default();
        g.set(7);
        register(&mut r, "g", "G.", g);
        let h = DurationHistogram::new(&[0.1, 1.0]);
        register(&mut r, "h_seconds", "H.", h.clone());
        register(
            &mut r,
            "netbore_build",
            "I.",
            Info::new(BuildLabels {
                component: "t",
                version: "1",
            }),
        );
        (r, c, h)
    }

    #[test]
    fn classic_text_names_counters_with_total_and_has_no_eof() {
        let (r, c, h) = sample_registry();
        c.inc();
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(5));
        let t = encode(&r, Format::Classic);
        assert_eq!(
            t,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n\
             # HELP b_total B.\n# TYPE b_total counter\nb_total{code=\"x_y\"} 2\n\
             # HELP g G.\n# TYPE g gauge\ng 7\n\
             # HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_sum 5.05\nh_seconds_count 2\n\
             h_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"1.0\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n\
             # HELP netbore_build_info I.\n# TYPE netbore_build_info gauge\nnetbore_build_info{component=\"t\",version=\"1\"} 1\n"
        );
        let om = encode(&r, Format::OpenMetrics);
        assert!(om.contains("# TYPE a counter\na_total 1\n"), "{om}");
        assert!(om.contains("# TYPE netbore_build info\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn accept_picks_the_format() {
        use Format::*;
        assert_eq!(Format::negotiate(None), Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Classic);
        assert_eq!(Format::negotiate(Some("text/plain")), Classic);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            OpenMetrics
        );
        // Prometheus 2.x and 3.x defaults.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
            )),
            OpenMetrics
        );
        // Asked for text first, or only an OpenMetrics version this does not write.
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4,application/openmetrics-text;q=0.5"
            )),
            Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=0.0.1")),
            Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Classic
        );
    }

    #[test]
    fn a_sampled_counter_never_falls() {
        let c = SampledCounter::default();
        assert_eq!(c.observe(200_000), 200_000);
        assert_eq!(c.observe(0), 200_000);
        assert_eq!(c.observe(200_001), 200_001);
        assert_eq!(c.get(), 200_001);
    }

    #[test]
    fn process_stats_parse_from_proc_text() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 123456789 2000 18446744073709551615";
        let status = "Name:\tx\nVmSize:\t  120560 kB\nVmRSS:\t    8192 kB\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let s = ProcessStats::parse(stat, status, boot, limits, 12, 100.0).unwrap();
        assert_eq!(
            s,
            ProcessStats {
                cpu_seconds: 3.0,
                start_time_seconds: 1_700_000_010.0,
                resident_bytes: 8192 * 1024,
                virtual_bytes: 120_560 * 1024,
                open_fds: 12,
                max_fds: Some(1024),
            }
        );
    }

    #[test]
    fn every_registry_serves_build_info_and_process_metrics() {
        let r = new_registry("edge", "9.9.9");
        let t = encode(&r, Format::Classic);
        assert!(
            t.contains("netbore_build_info{component=\"edge\",version=\"9.9.9\"} 1\n"),
            "{t}"
        );
        for f in [
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_virtual_memory_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(t.contains(f), "{f} missing from {t}");
        }
    }
}
