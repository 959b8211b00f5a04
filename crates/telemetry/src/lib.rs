//! Telemetry shared by the three binaries: logs to stderr, traces to an OpenTelemetry
//! collector over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, W3C trace context
//! in and out of HTTP heads ([`trace_context`]), Prometheus metrics ([`prom`]), the
//! admin listener serving them with the probes ([`admin`]) and the signal that starts a
//! drain ([`on_signal`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), netbore_telemetry::TelemetryError> {
//! let telemetry = netbore_telemetry::init("netbore-edge", false)?;
//! // ... serve ...
//! telemetry.shutdown().await; // flushes spans not yet exported
//! # Ok(()) }
//! ```

pub mod admin;
pub mod log_queue;
pub mod memory;
pub mod prom;
pub mod trace_context;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The variable that turns trace export on: the collector's OTLP/gRPC URL.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The traces-only form of [`OTLP_ENDPOINT_ENV`]; it wins when both are set.
pub const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Spans at this level and above are exported (the request spans are `info`).
pub const TRACE_LEVEL: tracing_subscriber::filter::LevelFilter =
    tracing_subscriber::filter::LevelFilter::INFO;
/// Longest wait for the collector to take the last spans when the process stops.
pub const FLUSH_ON_EXIT: Duration = Duration::from_secs(5);

/// Telemetry that cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The collector URL or protocol is not one this build can use.
    #[error("{0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error(
        "the OTLP exporter for {endpoint} could not be built: {source}; check {OTLP_ENDPOINT_ENV}"
    )]
    Exporter {
        /// The configured collector URL.
        endpoint: String,
        /// Why.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes spans before the process
/// exits.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

impl Telemetry {
    /// The collector spans go to, if trace export is on.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Exports the spans still queued (bounded by [`FLUSH_ON_EXIT`]) and stops the
    /// exporter. Does nothing when trace export is off.
    pub async fn shutdown(self) {
        // Access lines still queued are written first (bounded like the spans).
        let _ = tokio::task::spawn_blocking(|| log_queue::flush(FLUSH_ON_EXIT)).await;
        let Some(p) = self.provider else { return };
        // The SDK blocks while it exports; keep that off the async workers.
        let done = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(FLUSH_ON_EXIT));
        match tokio::time::timeout(FLUSH_ON_EXIT + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!(
                "warning: spans may be lost: flushing them to the OTLP collector failed: {e}"
            ),
            _ => eprintln!(
                "warning: spans may be lost: the OTLP collector did not take them within {FLUSH_ON_EXIT:?}"
            ),
        }
    }
}

/// The collector URL from the environment, checked: `None` when trace export is off.
pub fn otlp_endpoint_from_env() -> Result<Option<String>, TelemetryError> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let Some(url) = get(OTLP_TRACES_ENDPOINT_ENV).or_else(|| get(OTLP_ENDPOINT_ENV)) else {
        return Ok(None);
    };
    check_endpoint(&url, get("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref())?;
    Ok(Some(url))
}

/// Refuses collector settings this build cannot honour, saying what to set instead.
pub fn check_endpoint(url: &str, protocol: Option<&str>) -> Result<(), TelemetryError> {
    if let Some(p) = protocol
        && p != "grpc"
    {
        return Err(TelemetryError::Config(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL is '{p}', but Netbore exports traces over OTLP/gRPC only; unset it or set it to 'grpc', and point {OTLP_ENDPOINT_ENV} at the collector's gRPC port (usually 4317)"
        )));
    }
    if url.starts_with("https://") {
        return Err(TelemetryError::Config(format!(
            "{OTLP_ENDPOINT_ENV} is '{url}', but Netbore speaks plain OTLP/gRPC (no TLS) to the collector; run a collector next to it (a sidecar or node agent) and use http://HOST:4317"
        )));
    }
    if !url.starts_with("http://") || url.len() <= "http://".len() {
        return Err(TelemetryError::Config(format!(
            "{OTLP_ENDPOINT_ENV} is '{url}', which is not a URL; use the collector's gRPC address, e.g. http://otel-collector:4317"
        )));
    }
    Ok(())
}

/// Whether log lines get colours: only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>), so logs written to a file or a pipe stay plain text.
pub fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Installs the global subscriber: human-readable lines on stderr (JSON lines with
/// `json`), filtered by `RUST_LOG` (default `info`), and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span exported to that collector with
/// `service.name` = `service` (or `OTEL_SERVICE_NAME`).
///
/// Call it inside the Tokio runtime: the gRPC exporter runs on it. A second call
/// (tests running several components in one process) keeps the first subscriber.
pub fn init(service: &str, json: bool) -> Result<Telemetry, TelemetryError> {
    init_with_default(service, json, DEFAULT_LOG_FILTER)
}

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// Like [`init`], with `default_filter` in place of [`DEFAULT_LOG_FILTER`] when
/// `RUST_LOG` is not set (a program that draws on the terminal keeps routine logs off
/// it).
pub fn init_with_default(
    service: &str,
    json: bool,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    let endpoint = otlp_endpoint_from_env()?;
    let provider = match &endpoint {
        None => None,
        Some(url) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: url.clone(),
                    source,
                })?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name(service.to_string());
            }
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.build())
                    .build(),
            )
        }
    };
    let default_filter = default_filter.to_string();
    let env_filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&default_filter))
    };
    // Access lines go through a bounded queue to a writer thread (log_queue.rs), so a
    // slow stderr never blocks a request; every other line is written at once.
    let is_access = |m: &tracing::Metadata<'_>| m.target() == log_queue::ACCESS_TARGET;
    let others = env_filter().and(filter_fn(move |m| !is_access(m)));
    let access = env_filter().and(filter_fn(is_access));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs());
    let access_fmt = tracing_subscriber::fmt::layer()
        .with_writer(log_queue::AccessWriter)
        .with_ansi(colour_logs());
    let (fmt, access_fmt) = if json {
        (
            fmt.json().with_filter(others).boxed(),
            access_fmt.json().with_filter(access).boxed(),
        )
    } else {
        (
            fmt.with_filter(others).boxed(),
            access_fmt.with_filter(access).boxed(),
        )
    };
    // Spans are exported at `info` whatever RUST_LOG says, so quieter logs do not cost
    // the traces.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_string()))
            .with_filter(TRACE_LEVEL)
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(access_fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && let Some(url) = &endpoint {
        tracing::info!(collector = %url, service, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry { provider, endpoint })
}

/// Cancels `token` on the first SIGTERM or SIGINT, logging which.
pub async fn on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutdown requested");
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_settings_are_checked_with_the_fix_named() {
        assert!(check_endpoint("http://otel:4317", None).is_ok());
        assert!(check_endpoint("http://otel:4317", Some("grpc")).is_ok());
        let e = check_endpoint("https://otel:4317", None).unwrap_err();
        assert!(e.to_string().contains("http://HOST:4317"), "{e}");
        let e = check_endpoint("http://otel:4318", Some("http/protobuf")).unwrap_err();
        assert!(e.to_string().contains("OTLP/gRPC only"), "{e}");
        let e = check_endpoint("otel:4317", None).unwrap_err();
        assert!(e.to_string().contains("e.g. http://"), "{e}");
    }
}
