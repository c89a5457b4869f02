package main

import (
	"log/slog"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// serverStats are the server's own counters. They are atomics, so that
// counting costs a message or a subscription one add and no lock; the
// collector reads them at each scrape.
type serverStats struct {
	received, sent     atomic.Int64
	keySubs, tableSubs atomic.Int64
	errors             map[string]*atomic.Int64 // by code; the map is not written after newServerStats
}

func newServerStats() *serverStats {
	st := &serverStats{errors: make(map[string]*atomic.Int64, len(errorCodes))}
	for _, code := range errorCodes {
		st.errors[code] = new(atomic.Int64)
	}
	return st
}

func (st *serverStats) errorSent(code string) {
	if n := st.errors[code]; n != nil {
		n.Add(1)
	}
}

// subscribed counts a subscription made (n = 1) or ended (n = -1).
func (st *serverStats) subscribed(table bool, n int64) {
	if table {
		st.tableSubs.Add(n)
	} else {
		st.keySubs.Add(n)
	}
}

// newMetricsHandler serves, in Prometheus' formats, the server's figures,
// its storage's if it is a StatsSource, and the Go runtime's and the
// process's. The registry is the server's own, not the global default, so
// that every Server (the tests run several in one process) has its own.
func newMetricsHandler(s *Server) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		serverCollector{s},
	)
	if src, ok := s.storage.(StatsSource); ok {
		reg.MustRegister(storeCollector{src})
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelError),
		Registry: reg, // counts its own failures
	})
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

// metricSenders returns functions that send a gauge's and a counter's value
// on ch, as a collector's Collect does.
func metricSenders(ch chan<- prometheus.Metric) (gauge, counter func(d *prometheus.Desc, v float64, labels ...string)) {
	send := func(t prometheus.ValueType) func(*prometheus.Desc, float64, ...string) {
		return func(d *prometheus.Desc, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, t, v, labels...)
		}
	}
	return send(prometheus.GaugeValue), send(prometheus.CounterValue)
}

// The series of a pgstore connector, from its Stats. Lags are gauges over
// the subscriptions that follow a log, summed (entries) and at their worst
// (entries and time): Stats gives subscriptions no name to label them by,
// and this server has one subscription per node anyway.
var (
	descBufferedWrites   = desc("pgstore_buffered_writes", "Writes accepted and not yet durable or failed.")
	descBufferedBytes    = desc("pgstore_buffered_bytes", "Bytes the buffered writes hold against the buffer limit.")
	descFlushes          = desc("pgstore_flushes_total", "Batches written, whatever their outcome.")
	descFlushSeconds     = desc("pgstore_flush_seconds_total", "Time spent writing batches, retries and resolving lost answers included.")
	descLastFlushSeconds = desc("pgstore_last_flush_seconds", "Time the last batch took.")
	descDurableWrites    = desc("pgstore_durable_writes_total", "Writes made durable; a write replaced in the buffer by a later one of its key is not counted apart.")
	descRetries          = desc("pgstore_retries_total", "Attempts at a batch after its first.")
	descFailedWrites     = desc("pgstore_failed_writes_total", "Writes that failed after they were accepted, by cause: refused (by the server or the version guard), timed_out, unknown (outcome unknown), closed (Close ended first).", "cause")
	descListenerUp       = desc("pgstore_listener_up", "1 if the LISTEN connection is up and listens on every channel the subscriptions need, else 0.")
	descListenerSince    = desc("pgstore_listener_since_timestamp_seconds", "Unix time since which the LISTEN connection listens, or since which it is lost; absent before either.")
	descReconnects       = desc("pgstore_listener_reconnects_total", "Lost LISTEN connections replaced.")
	descSubscriptions    = desc("pgstore_subscriptions", "Open subscriptions.")
	descEvents           = desc("pgstore_events_delivered_total", "Handler calls of every subscription, open or closed.")
	descResyncs          = desc("pgstore_resyncs_total", "Resync events delivered.")
	descOverflows        = desc("pgstore_overflows_total", "Times a subscription of the NOTIFY feed dropped events for a slow handler.")
	descLogBytes         = desc("pgstore_log_bytes", "Size on disk of the schema's change log, entries with their indexes, measured at most a minute ago; absent without a log or before the first measure.")
	descLagEntries       = desc("pgstore_log_lag_entries", "Entries of the change log yet to deliver, summed over the subscriptions that follow it.")
	descLagMaxEntries    = desc("pgstore_log_lag_max_entries", "Entries of the change log yet to deliver by the subscription furthest behind.")
	descLagMaxSeconds    = desc("pgstore_log_lag_max_seconds", "How long ago the entry being delivered by the subscription furthest behind was appended; 0 once all have caught up.")
)

// A storeCollector reads its source's Stats once per scrape: they are
// counters read without a query.
type storeCollector struct{ src StatsSource }

func (c storeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descBufferedWrites, descBufferedBytes, descFlushes, descFlushSeconds, descLastFlushSeconds,
		descDurableWrites, descRetries, descFailedWrites, descListenerUp, descListenerSince,
		descReconnects, descSubscriptions, descEvents, descResyncs, descOverflows,
		descLogBytes, descLagEntries, descLagMaxEntries, descLagMaxSeconds,
	} {
		ch <- d
	}
}

func (c storeCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.src.Stats()
	gauge, counter := metricSenders(ch)
	gauge(descBufferedWrites, float64(st.BufferedWrites))
	gauge(descBufferedBytes, float64(st.BufferedBytes))
	counter(descFlushes, float64(st.Flushes))
	counter(descFlushSeconds, st.FlushTime.Seconds())
	gauge(descLastFlushSeconds, st.LastFlushTime.Seconds())
	counter(descDurableWrites, float64(st.DurableWrites))
	counter(descRetries, float64(st.Retries))
	// Every cause, at 0 too: a series that appears only with its first
	// failure hides that first increase from rate() and increase().
	f := st.FailedWrites
	counter(descFailedWrites, float64(f.Refused), "refused")
	counter(descFailedWrites, float64(f.TimedOut), "timed_out")
	counter(descFailedWrites, float64(f.Unknown), "unknown")
	counter(descFailedWrites, float64(f.Closed), "closed")
	up := 0.0
	if st.Listener.Listening {
		up = 1
	}
	gauge(descListenerUp, up)
	if !st.Listener.Since.IsZero() {
		gauge(descListenerSince, float64(st.Listener.Since.UnixNano())/1e9)
	}
	counter(descReconnects, float64(st.Listener.Reconnects))
	gauge(descSubscriptions, float64(st.Subscriptions))
	counter(descEvents, float64(st.EventsDelivered))
	counter(descResyncs, float64(st.Resyncs))
	counter(descOverflows, float64(st.Overflows))
	if st.Log == nil {
		return
	}
	if !st.Log.BytesAt.IsZero() {
		gauge(descLogBytes, float64(st.Log.Bytes))
	}
	var sum, most int64
	var behind float64
	for _, lag := range st.Log.Lags {
		sum += lag.Entries
		most = max(most, lag.Entries)
		behind = max(behind, lag.Behind.Seconds())
	}
	gauge(descLagEntries, float64(sum))
	gauge(descLagMaxEntries, float64(most))
	gauge(descLagMaxSeconds, behind)
}

// The server's own series.
var (
	descClients       = desc("realtime_clients", "Connected WebSocket clients.")
	descClientSubs    = desc("realtime_subscriptions", "Subscriptions the clients hold, by kind: key or table.", "kind")
	descReceived      = desc("realtime_messages_received_total", "Messages received from clients, whatever they held.")
	descSent          = desc("realtime_messages_sent_total", "Messages written to clients: replies and pushes.")
	descErrorsSent    = desc("realtime_errors_sent_total", "Error replies sent, by code.", "code")
	serverDescriptors = []*prometheus.Desc{descClients, descClientSubs, descReceived, descSent, descErrorsSent}
)

type serverCollector struct{ s *Server }

func (c serverCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range serverDescriptors {
		ch <- d
	}
}

func (c serverCollector) Collect(ch chan<- prometheus.Metric) {
	s, st := c.s, c.s.stats
	s.mu.Lock()
	clients := len(s.clients)
	s.mu.Unlock()
	gauge, counter := metricSenders(ch)
	gauge(descClients, float64(clients))
	gauge(descClientSubs, float64(st.keySubs.Load()), "key")
	gauge(descClientSubs, float64(st.tableSubs.Load()), "table")
	counter(descReceived, float64(st.received.Load()))
	counter(descSent, float64(st.sent.Load()))
	for _, code := range errorCodes {
		counter(descErrorsSent, float64(st.errors[code].Load()), code)
	}
}
