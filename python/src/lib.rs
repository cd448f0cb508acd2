//! The `inagg._inagg` extension module: the worker library ([`inagg_worker`]) for
//! Python. `inagg.Worker(aggregator, job, rank, world, codec, ...)` joins a job;
//! `allreduce(buf)` sums a contiguous float32 numpy array or CPU torch tensor in place,
//! with the GIL released, and returns the call's statistics as a dict.
//!
//! Buffers are taken without copying: a torch tensor by `data_ptr()`, anything else by
//! the numpy array interface (`__array_interface__`). (The buffer protocol is not in
//! the stable ABI before Python 3.11, and this module is built once for every CPython
//! from 3.8 on.) The object stays referenced for the whole call; mutating or resizing
//! it from another thread meanwhile is the caller's error, as with any in-place
//! operation that releases the GIL.
//!
//! Library errors become exceptions derived from `inagg.InaggError`, one per cause.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use inagg_proto::codec;
use inagg_worker::{
    AllreduceReport, Error, Options, QuicMode, QuicOptions, Transport, Trust, Worker as RustWorker,
    WorkerError,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionRefusedError, PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    _inagg,
    InaggError,
    PyException,
    "Base class of every error from the inagg library."
);
create_exception!(
    _inagg,
    RefusedError,
    InaggError,
    "The aggregator refused this rank: wrong secret, a job with other settings, no room."
);
create_exception!(
    _inagg,
    JoinTimeoutError,
    InaggError,
    "No grant in time: the aggregator is unreachable or not every rank joined."
);
create_exception!(
    _inagg,
    AbortedError,
    InaggError,
    "The aggregator aborted the job, for example because a peer went silent."
);
create_exception!(
    _inagg,
    StalledError,
    InaggError,
    "No progress: some rank is alive but does not take part in this allreduce."
);
create_exception!(
    _inagg,
    AggregatorSilentError,
    InaggError,
    "Nothing heard from the aggregator: it is down or unreachable."
);
create_exception!(
    _inagg,
    ConnectError,
    InaggError,
    "The QUIC connection failed: handshake, certificate or fingerprint mismatch."
);
create_exception!(_inagg, ClosedError, InaggError, "The worker is closed.");

/// The error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

fn to_py(e: Error) -> PyErr {
    let msg = chain(&e);
    match e {
        Error::Config(_) | Error::AdmissionKey { .. } => PyValueError::new_err(msg),
        Error::Refused(_) => PyConnectionRefusedError::new_err(msg),
        Error::Quic(_) | Error::ShardMismatch { .. } => ConnectError::new_err(msg),
        Error::Protocol(p) => match p {
            WorkerError::Refused { .. } => RefusedError::new_err(msg),
            WorkerError::JoinTimeout(_) => JoinTimeoutError::new_err(msg),
            WorkerError::Aborted { .. } => AbortedError::new_err(msg),
            WorkerError::Stalled(_) => StalledError::new_err(msg),
            WorkerError::AggregatorSilent(_) => AggregatorSilentError::new_err(msg),
            WorkerError::NonFinite(_) => PyValueError::new_err(msg),
            WorkerError::Closed => ClosedError::new_err(msg),
            _ => InaggError::new_err(msg),
        },
        _ => InaggError::new_err(msg),
    }
}

/// Where a float32 buffer lives: address and element count.
struct Raw {
    addr: usize,
    len: usize,
}

/// Finds the memory of a contiguous, writable float32 torch tensor (CPU) or numpy
/// array (or anything with the array interface).
fn raw_f32(obj: &Bound<'_, PyAny>) -> PyResult<Raw> {
    if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
        let dtype = obj.getattr("dtype")?.str()?.to_string();
        if dtype != "torch.float32" {
            return Err(PyTypeError::new_err(format!(
                "allreduce sums float32 tensors, not {dtype}"
            )));
        }
        let device = obj.getattr("device")?.getattr("type")?.str()?.to_string();
        if device != "cpu" {
            return Err(PyTypeError::new_err(format!(
                "allreduce takes CPU tensors, not {device} ones (copy to the CPU first)"
            )));
        }
        if !obj.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(PyValueError::new_err(
                "allreduce needs a contiguous tensor (call .contiguous())",
            ));
        }
        if obj.getattr("requires_grad")?.extract::<bool>()? {
            return Err(PyValueError::new_err(
                "allreduce writes in place: pass a tensor that does not require grad (.detach())",
            ));
        }
        let addr: usize = obj.call_method0("data_ptr")?.extract()?;
        let len: usize = obj.call_method0("numel")?.extract()?;
        return Ok(Raw { addr, len });
    }
    let Ok(ai) = obj.getattr("__array_interface__") else {
        return Err(PyTypeError::new_err(format!(
            "allreduce takes a float32 numpy array or torch tensor, not {}",
            obj.get_type().name()?
        )));
    };
    let typestr: String = ai.get_item("typestr")?.extract()?;
    if typestr != "<f4" {
        return Err(PyTypeError::new_err(format!(
            "allreduce sums float32 (<f4) arrays, not {typestr}"
        )));
    }
    let (addr, readonly): (usize, bool) = ai.get_item("data")?.extract()?;
    if readonly {
        return Err(PyValueError::new_err(
            "allreduce writes in place: the array is read-only",
        ));
    }
    let shape: Vec<usize> = ai.get_item("shape")?.extract()?;
    let len = shape.iter().product();
    let strides = ai.get_item("strides")?;
    if !strides.is_none() {
        // C-contiguous: the last axis has stride 4, each earlier one spans the rest.
        let strides: Vec<isize> = strides.extract()?;
        let mut want = 4isize;
        for (s, n) in strides.iter().zip(&shape).rev() {
            if *n > 1 && *s != want {
                return Err(PyValueError::new_err(
                    "allreduce needs a C-contiguous array (numpy.ascontiguousarray)",
                ));
            }
            want = want.saturating_mul(isize::try_from(*n).unwrap_or(isize::MAX));
        }
    }
    Ok(Raw { addr, len })
}

/// Refuses a buffer whose start is not aligned for `f32` (a numpy view at an odd byte
/// offset, `np.frombuffer(b, dtype='<f4', offset=1)`): a slice of `f32` there is
/// undefined behaviour, and the kernels read it with aligned vector loads.
fn aligned(raw: Raw) -> PyResult<Raw> {
    if raw.len > 0 && raw.addr % std::mem::align_of::<f32>() != 0 {
        return Err(PyValueError::new_err(format!(
            "allreduce needs a float32 buffer aligned to 4 bytes; this one starts at an \
             address {} bytes past that (copy it: numpy.array(a) or tensor.clone())",
            raw.addr % std::mem::align_of::<f32>()
        )));
    }
    Ok(raw)
}

fn report(py: Python<'_>, r: &AllreduceReport) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    d.set_item("elapsed_s", r.elapsed.as_secs_f64())?;
    d.set_item("elements", r.elements)?;
    d.set_item("packets_sent", r.packets_sent)?;
    d.set_item("bytes_sent", r.bytes_sent)?;
    d.set_item("packets_received", r.packets_received)?;
    d.set_item("bytes_received", r.bytes_received)?;
    d.set_item("retransmissions", r.retransmissions)?;
    d.set_item("retransmitted_bytes", r.retransmitted_bytes)?;
    d.set_item("probes", r.probes)?;
    d.set_item("duplicate_results", r.duplicate_results)?;
    d.set_item("marks", r.marks)?;
    d.set_item("dips", r.dips)?;
    d.set_item("pacing_holds", r.pacing_holds)?;
    d.set_item("overflows", r.overflows)?;
    Ok(d.unbind())
}

fn resolve(what: &str, s: &str) -> PyResult<SocketAddr> {
    inagg_worker::resolve(s)
        .map_err(|e| PyValueError::new_err(format!("{what} {s:?} is not a HOST:PORT address: {e}")))
}

/// One rank of one job. Joins on construction (returns once every rank has joined);
/// use as a context manager or call `close()`.
#[pyclass(module = "inagg._inagg")]
struct Worker {
    inner: Option<RustWorker>,
    rank: u16,
    world: u16,
    codec: &'static str,
    chunk_elements: u16,
    window: u32,
    stripes: usize,
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (
        aggregator, job, rank, world, codec = "f32", *, secret = "", transport = "udp",
        ca = None, fingerprint = None, server_name = None, quic_mode = "stream",
        stripes = None, chunk_elements = None, window = None, stochastic_rounding = None,
        skip_zeros = false, congestion_control = true, queue_target = None, dip_interval = None,
        overflow_hold = None, join_timeout = None,
        aggregator_timeout = None, yields_before_sleep = None, multicast = true,
        failover = None, admission_key = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        aggregator: &str,
        job: u32,
        rank: u16,
        world: u16,
        codec: &str,
        secret: &str,
        transport: &str,
        ca: Option<PathBuf>,
        fingerprint: Option<&str>,
        server_name: Option<String>,
        quic_mode: &str,
        stripes: Option<Vec<String>>,
        chunk_elements: Option<u16>,
        window: Option<u32>,
        stochastic_rounding: Option<u64>,
        skip_zeros: bool,
        congestion_control: bool,
        queue_target: Option<u32>,
        dip_interval: Option<f64>,
        overflow_hold: Option<f64>,
        join_timeout: Option<f64>,
        aggregator_timeout: Option<f64>,
        yields_before_sleep: Option<u32>,
        multicast: bool,
        failover: Option<Vec<String>>,
        admission_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let c = codec::by_name(codec).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown codec {codec:?}; known: {}",
                codec::names().join(", ")
            ))
        })?;
        let addr = resolve("aggregator", aggregator)?;
        let mut o = Options::new(addr, job, rank, world, c.id());
        o.stripes = stripes
            .unwrap_or_default()
            .iter()
            .map(|s| resolve("stripe", s))
            .collect::<PyResult<_>>()?;
        o.protocol.secret = secret.as_bytes().to_vec();
        if let Some(k) = chunk_elements {
            o.protocol.chunk_elems = k;
        }
        o.protocol.stochastic_rounding = stochastic_rounding;
        o.protocol.skip_zeros = skip_zeros;
        o.protocol.window = window.unwrap_or_else(|| {
            inagg_worker::default_window_for(c, &addr, o.protocol.chunk_elems, skip_zeros)
        });
        o.protocol.congestion_control = congestion_control;
        if let Some(t) = queue_target {
            o.protocol.queue_target = (t > 0).then_some(t);
        }
        if let Some(y) = yields_before_sleep {
            o.yields_before_sleep = y;
        }
        o.multicast = multicast;
        o.failover = failover
            .unwrap_or_default()
            .iter()
            .map(|s| resolve("failover", s))
            .collect::<PyResult<_>>()?;
        o.protocol.admission_key = match admission_key {
            None => None,
            // The key itself, or the path of its file.
            Some(k) => Some(match k.extract::<Vec<u8>>() {
                Ok(bytes) if k.is_instance_of::<pyo3::types::PyBytes>() => bytes,
                _ => {
                    let path: PathBuf = k.extract()?;
                    inagg_worker::read_admission_key(&path).map_err(to_py)?
                }
            }),
        };
        let secs = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err(format!("{name} must be positive seconds")))
        };
        if let Some(t) = join_timeout {
            o.protocol.join_timeout = secs("join_timeout", t)?;
        }
        if let Some(t) = aggregator_timeout {
            o.protocol.aggregator_timeout = secs("aggregator_timeout", t)?;
        }
        // A rule's duration: 0 turns the rule off.
        let off_or_secs = |name: &str, v: f64| {
            if v == 0.0 {
                Ok(None)
            } else {
                secs(name, v).map(Some)
            }
        };
        if let Some(t) = dip_interval {
            o.protocol.dip_interval = off_or_secs("dip_interval", t)?;
        }
        if let Some(t) = overflow_hold {
            o.protocol.overflow_hold = off_or_secs("overflow_hold", t)?;
        }
        o.transport =
            match transport {
                "udp" => Transport::Udp,
                "quic" => {
                    let trust =
                        match (ca, fingerprint) {
                            (Some(ca), None) => Trust::Ca(ca),
                            (None, Some(fp)) => Trust::fingerprint(fp)
                                .map_err(|e| PyValueError::new_err(e.to_string()))?,
                            _ => return Err(PyValueError::new_err(
                                "transport='quic' needs exactly one of ca=FILE or fingerprint=HEX",
                            )),
                        };
                    let mut q = QuicOptions::new(trust);
                    if let Some(n) = server_name {
                        q.server_name = n;
                    }
                    q.mode = match quic_mode {
                        "stream" => QuicMode::Stream,
                        "datagram" => QuicMode::Datagram,
                        m => {
                            return Err(PyValueError::new_err(format!(
                                "quic_mode must be 'stream' or 'datagram', not {m:?}"
                            )))
                        }
                    };
                    Transport::Quic(q)
                }
                t => {
                    return Err(PyValueError::new_err(format!(
                        "transport must be 'udp' or 'quic', not {t:?}"
                    )))
                }
            };
        let w = py
            .allow_threads(move || RustWorker::connect(o))
            .map_err(to_py)?;
        let g = w.grant().map_err(to_py)?;
        let stripes = w.stripes();
        Ok(Self {
            inner: Some(w),
            rank,
            world,
            codec: c.name(),
            chunk_elements: g.chunk_elems,
            window: g.window,
            stripes,
        })
    }

    /// Sums `buf` (a contiguous float32 numpy array or CPU torch tensor) with every
    /// other rank's buffer of the same length, in place. With `key`, error feedback:
    /// the quantization residual of the last call with the same key is added first.
    /// Returns the call's statistics.
    ///
    /// The buffer must be aligned to 4 bytes (a `ValueError` otherwise), and must not
    /// be resized, freed or written by another thread during the call: the sum is
    /// written into its memory while the GIL is released.
    #[pyo3(signature = (buf, key = None))]
    fn allreduce(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        key: Option<u64>,
    ) -> PyResult<Py<PyDict>> {
        let w = self
            .inner
            .clone()
            .ok_or_else(|| ClosedError::new_err("the worker is closed"))?;
        let Raw { addr, len } = aligned(raw_f32(buf)?)?;
        let r = py
            .allow_threads(move || {
                let data: &mut [f32] = if len == 0 {
                    &mut []
                } else {
                    // SAFETY: `addr` is the start of `len` contiguous, writable float32
                    // values owned by `buf` (checked by `raw_f32`), aligned (checked by
                    // `aligned`), which the caller's frame keeps alive until this call
                    // returns; the docstring tells callers not to resize or free it from
                    // another thread meanwhile.
                    unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, len) }
                };
                match key {
                    Some(k) => w.allreduce_with_feedback(data, k),
                    None => w.allreduce(data),
                }
            })
            .map_err(to_py)?;
        report(py, &r)
    }

    /// Leaves the job (every rank's sessions end once all have left).
    fn close(&mut self, py: Python<'_>) {
        if let Some(w) = self.inner.take() {
            py.allow_threads(move || w.close());
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// This rank.
    #[getter]
    fn rank(&self) -> u16 {
        self.rank
    }

    /// How many times the job moved to a failover aggregator (`failover=[...]`).
    #[getter]
    fn failovers(&self) -> usize {
        self.inner.as_ref().map_or(0, |w| w.failovers().len())
    }

    /// Ranks in the job.
    #[getter]
    fn world(&self) -> u16 {
        self.world
    }

    /// The codec's name.
    #[getter]
    fn codec(&self) -> &'static str {
        self.codec
    }

    /// Elements per chunk, as granted.
    #[getter]
    fn chunk_elements(&self) -> u16 {
        self.chunk_elements
    }

    /// Slots granted (by the first aggregator).
    #[getter]
    fn window(&self) -> u32 {
        self.window
    }

    /// Aggregators the job is striped over: those given (`aggregator` and `stripes`)
    /// and the other shards of each sharded one (`inagg aggregator --threads`).
    #[getter]
    fn stripes(&self) -> usize {
        self.stripes
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    fn __repr__(&self) -> String {
        format!(
            "inagg.Worker(rank={}, world={}, codec={:?}{})",
            self.rank,
            self.world,
            self.codec,
            if self.inner.is_none() { ", closed" } else { "" }
        )
    }
}

/// The codecs' names.
#[pyfunction]
fn codecs() -> Vec<&'static str> {
    codec::names()
}

#[pymodule]
fn _inagg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Worker>()?;
    m.add_function(wrap_pyfunction!(codecs, m)?)?;
    m.add("InaggError", py.get_type::<InaggError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("JoinTimeoutError", py.get_type::<JoinTimeoutError>())?;
    m.add("AbortedError", py.get_type::<AbortedError>())?;
    m.add("StalledError", py.get_type::<StalledError>())?;
    m.add(
        "AggregatorSilentError",
        py.get_type::<AggregatorSilentError>(),
    )?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
