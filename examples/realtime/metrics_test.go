package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// A scrape is what /metrics served, by family.
type scrape map[string]*dto.MetricFamily

// get fetches path from h and returns the status and body.
func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

// scrapeMetrics reads /metrics as Prometheus does, checks the exposition
// with promlint (for the server's own series: the Go and process
// collectors' are not ours to judge), and parses it.
func scrapeMetrics(t *testing.T, url string) scrape {
	t.Helper()
	resp, body := httpGet(t, url+"/metrics")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics = %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	problems, err := promlint.New(bytes.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "pgstore_") || strings.HasPrefix(p.Metric, "realtime_") {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// value returns the value of the series of family name with the label
// pairs given, failing the test if there is none or it has the wrong type.
func (s scrape) value(t *testing.T, name string, typ dto.MetricType, labels ...string) float64 {
	t.Helper()
	mf := s[name]
	if mf == nil {
		t.Fatalf("no series %s", name)
	}
	if mf.GetType() != typ {
		t.Fatalf("%s is a %v, want a %v", name, mf.GetType(), typ)
	}
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				found = found || lp.GetName() == labels[i] && lp.GetValue() == labels[i+1]
			}
			if !found {
				continue next
			}
		}
		if typ == dto.MetricType_COUNTER {
			return m.GetCounter().GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

// await scrapes until cond holds of the scrape, failing after waitTimeout.
func await(t *testing.T, url, what string, cond func(scrape) bool) scrape {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		s := scrapeMetrics(t, url)
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: still not %s", waitTimeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const (
	counter = dto.MetricType_COUNTER
	gauge   = dto.MetricType_GAUGE
)

func TestMetrics(t *testing.T) {
	t.Parallel()
	start := time.Now()
	n := startNode(t, pgtest.Schema(t), pgstore.WithChangeLog(time.Hour))
	url := n.http.URL
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "subscribe", "key": "m/a"}) // starts the feed
	c.awaitDeleted("m/a")
	for v := int64(1); v <= 3; v++ {
		c.requestOK(map[string]any{"type": "set", "key": "m/a", "version": v, "value": v})
		c.awaitRecord("m/a", v)
	}
	if m := c.request(map[string]any{"type": "subscribe", "key": "no-slash"}); m.Code != codeBadKey {
		t.Fatalf("got %v, want bad_key", m)
	}

	// Every message was received before its answer was sent; sent counts
	// a message once written, which may be after the client read it. Sent:
	// the state and ok of subscribe, the ok and push of each set, the error.
	s := await(t, url, "9 messages sent", func(s scrape) bool {
		return s.value(t, "realtime_messages_sent_total", counter) == 9
	})
	for _, want := range []struct {
		name   string
		typ    dto.MetricType
		labels []string
		min    float64
		max    float64 // -1: no bound
	}{
		{"pgstore_durable_writes_total", counter, nil, 3, -1},
		{"pgstore_flushes_total", counter, nil, 1, -1},
		{"pgstore_flush_seconds_total", counter, nil, 0, -1},
		{"pgstore_last_flush_seconds", gauge, nil, 0, -1},
		{"pgstore_retries_total", counter, nil, 0, 0},
		{"pgstore_failed_writes_total", counter, []string{"cause", "refused"}, 0, 0},
		{"pgstore_failed_writes_total", counter, []string{"cause", "timed_out"}, 0, 0},
		{"pgstore_failed_writes_total", counter, []string{"cause", "unknown"}, 0, 0},
		{"pgstore_failed_writes_total", counter, []string{"cause", "closed"}, 0, 0},
		{"pgstore_buffered_writes", gauge, nil, 0, 0},
		{"pgstore_buffered_bytes", gauge, nil, 0, 0},
		{"pgstore_listener_up", gauge, nil, 1, 1},
		{"pgstore_listener_since_timestamp_seconds", gauge, nil, float64(start.Unix()), float64(time.Now().Unix() + 1)},
		{"pgstore_listener_reconnects_total", counter, nil, 0, 0},
		{"pgstore_subscriptions", gauge, nil, 1, 1},
		{"pgstore_events_delivered_total", counter, nil, 3, -1},
		{"pgstore_resyncs_total", counter, nil, 0, 0},
		{"pgstore_overflows_total", counter, nil, 0, 0},
		{"pgstore_log_lag_entries", gauge, nil, 0, -1},
		{"pgstore_log_lag_max_entries", gauge, nil, 0, -1},
		{"pgstore_log_lag_max_seconds", gauge, nil, 0, -1},
		{"realtime_clients", gauge, nil, 1, 1},
		{"realtime_subscriptions", gauge, []string{"kind", "key"}, 1, 1},
		{"realtime_subscriptions", gauge, []string{"kind", "table"}, 0, 0},
		{"realtime_messages_received_total", counter, nil, 5, 5},
		{"realtime_errors_sent_total", counter, []string{"code", codeBadKey}, 1, 1},
		{"realtime_errors_sent_total", counter, []string{"code", codeUnavailable}, 0, 0},
		{"go_goroutines", gauge, nil, 1, -1},
		{"process_start_time_seconds", gauge, nil, 1, -1},
	} {
		v := s.value(t, want.name, want.typ, want.labels...)
		if v < want.min || want.max >= 0 && v > want.max {
			t.Errorf("%s%v = %v, want it in [%v, %v]", want.name, want.labels, v, want.min, want.max)
		}
	}
	for name := range s {
		if strings.HasPrefix(name, "promhttp_") || strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
			continue
		}
		if len(s[name].GetMetric()) == 0 {
			t.Errorf("%s has no series", name)
		}
	}

	// A client that leaves takes its subscriptions with it.
	c.conn.Close(websocket.StatusNormalClosure, "")
	await(t, url, "0 clients and 0 subscriptions", func(s scrape) bool {
		return s.value(t, "realtime_clients", gauge) == 0 && s.value(t, "realtime_subscriptions", gauge, "kind", "key") == 0
	})
}

// TestHealth cuts a node off from PostgreSQL and lets it back.
func TestHealth(t *testing.T) {
	t.Parallel()
	proxy, url := pgtest.NewProxy(t)
	n := startNodeURL(t, url, pgtest.Schema(t), Limits{})
	if code, body := get(t, n.srv, "/healthz"); code != http.StatusServiceUnavailable || body != "change feed: not started\n" {
		t.Fatalf("before Start: %d %q, want 503 and the feed not started", code, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := n.srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, n.srv, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("started: %d %q, want 200 ok", code, body)
	}

	// Cut closes the LISTEN connection and the pool's, and refuses new
	// ones: the listener sees its connection end, and the ping fails.
	proxy.Cut()
	awaitHealth(t, n, http.StatusServiceUnavailable, "change feed: not listening (lost ", "store: ping: ")
	proxy.Restore()
	awaitHealth(t, n, http.StatusOK, "ok\n")
}

// awaitHealth polls /healthz until it answers code with a body that holds
// each of want, failing after waitTimeout.
func awaitHealth(t *testing.T, n *node, code int, want ...string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		got, body := get(t, n.srv, "/healthz")
		ok := got == code
		for _, w := range want {
			ok = ok && strings.Contains(body, w)
		}
		if ok {
			t.Logf("/healthz = %d %q", got, body)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: /healthz = %d %q, want %d with %q", waitTimeout, got, body, code, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A fakeStorage has no database: its feed never starts, and it answers a
// ping with pingErr.
type fakeStorage struct{ pingErr error }

var errFake = errors.New("fake storage")

func (fakeStorage) Set(context.Context, string, int64, any) error { return errFake }
func (fakeStorage) Get(context.Context, string) (pgstore.Record, error) {
	return pgstore.Record{}, errFake
}
func (fakeStorage) Delete(context.Context, string) error { return errFake }
func (fakeStorage) Subscribe(context.Context, func(pgstore.Event), ...pgstore.Filter) (*pgstore.Subscription, error) {
	return nil, errFake
}
func (f fakeStorage) Ping(context.Context) error { return f.pingErr }

// TestHealthWithoutADatabase runs a server on a storage that is only a
// Storage and a Pinger: /healthz says all that is wrong, and /metrics has
// the server's series and no pgstore ones.
func TestHealthWithoutADatabase(t *testing.T) {
	t.Parallel()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv := NewServer(fakeStorage{pingErr: errors.New("ping: no route to host")}, Limits{}, logger)
	defer srv.Close()
	if err := srv.Start(context.Background()); !errors.Is(err, errFake) {
		t.Fatalf("Start: %v, want the storage's error", err)
	}
	if code, body := get(t, srv, "/healthz"); code != http.StatusServiceUnavailable ||
		body != "change feed: not started\nstore: ping: no route to host\n" {
		t.Fatalf("/healthz = %d %q", code, body)
	}
	code, body := get(t, srv, "/metrics")
	if code != http.StatusOK || !strings.Contains(body, "\nrealtime_clients 0\n") || strings.Contains(body, "pgstore_") {
		t.Fatalf("/metrics = %d:\n%s", code, body)
	}
	srv.Close()
	if code, body := get(t, srv, "/healthz"); code != http.StatusServiceUnavailable || body != "server closing\n" {
		t.Fatalf("/healthz after Close = %d %q", code, body)
	}
}
