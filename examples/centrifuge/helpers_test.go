package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore/examples/centrifuge/internal/cftest"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// waitTimeout bounds every wait of a test: reaching it fails the test. It is
// generous because the machine may be busy with other tests.
const waitTimeout = 30 * time.Second

// newSchema names a schema of the test's own, dropped when it ends.
func newSchema(t testing.TB) string {
	t.Helper()
	return pgtest.SchemaWithPrefix(t, "centrifuge_test_")
}

// A node is a Server on a pool of its own, served on loopback.
type node struct {
	srv  *Server
	pool *pgxpool.Pool
	http *httptest.Server
	url  string // of the page
	ws   string // of the WebSocket endpoint
}

// startNode starts a node on schema with cfg (its Pool and Schema set
// here); everything it holds is closed when the test ends.
func startNode(t testing.TB, schema string, cfg Config) *node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	pcfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	pcfg.MaxConns = 16
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	cfg.Pool = pool
	cfg.Schema = schema
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	srv, err := NewServer(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Errorf("close node: %v", err)
		}
	})
	return &node{srv: srv, pool: pool, http: hs, url: hs.URL + "/", ws: "ws" + strings.TrimPrefix(hs.URL, "http") + "/connection/websocket"}
}

// stored reads a key's record straight from PostgreSQL, past every node:
// its version (the stream offset that wrote it) and its data.
func stored(t testing.TB, n *node, channel, key string) (version int64, data json.RawMessage, found bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	err := n.pool.QueryRow(ctx, "SELECT version, (val->>'data')::jsonb FROM "+pgx.Identifier{n.srv.cfg.Schema, channel}.Sanitize()+" WHERE id = $1", key).Scan(&version, &data)
	if err == pgx.ErrNoRows {
		return 0, nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return version, data, true
}

// sameJSON reports whether a and b hold the same JSON value.
func sameJSON(t testing.TB, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	xs, _ := json.Marshal(x)
	ys, _ := json.Marshal(y)
	return string(xs) == string(ys)
}

// A js is a node process running testdata/mapclient.js: centrifuge-js
// clients, driven by commands and heard by events.
type js struct {
	t       testing.TB
	stdin   io.WriteCloser
	events  chan jsEvent
	backlog []jsEvent
}

// A jsEvent is any event of mapclient.js.
type jsEvent struct {
	Ev            string          `json:"ev,omitempty"`
	Client        string          `json:"client,omitempty"`
	Channel       string          `json:"channel,omitempty"`
	WasRecovering bool            `json:"wasRecovering,omitempty"`
	Recovered     bool            `json:"recovered,omitempty"`
	Offset        uint64          `json:"offset,omitempty"`
	Epoch         string          `json:"epoch,omitempty"`
	Entries       []jsEntry       `json:"entries,omitempty"`
	Key           string          `json:"key,omitempty"`
	Removed       bool            `json:"removed,omitempty"`
	Data          json.RawMessage `json:"data,omitempty"`
	Ref           string          `json:"ref,omitempty"`
	Error         string          `json:"error,omitempty"`
	Code          int             `json:"code,omitempty"`
	Reason        string          `json:"reason,omitempty"`
	Offsets       []uint64        `json:"offsets,omitempty"`
	Latencies     []int64         `json:"latencies,omitempty"`
}

type jsEntry struct {
	Key    string          `json:"key"`
	Offset uint64          `json:"offset"`
	Data   json.RawMessage `json:"data"`
}

func (e jsEvent) String() string {
	e.Offsets, e.Latencies = nil, nil // too long to show
	b, _ := json.Marshal(e)
	return string(b)
}

// startJS starts mapclient.js, or skips the test without node (fails it
// under CI=true). The process ends when the test does.
func startJS(t testing.TB) *js {
	t.Helper()
	path, err := exec.LookPath("node")
	if err != nil {
		cftest.SkipOrFail(t, "no node on $PATH for the centrifuge-js clients (Node.js 20 or later)")
	}
	cmd := exec.Command(path, "--experimental-websocket", "--no-warnings", "testdata/mapclient.js")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = t.Output()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	j := &js{t: t, stdin: stdin, events: make(chan jsEvent, 1024)}
	read := make(chan struct{})
	go func() {
		defer close(read)
		defer close(j.events)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
		for sc.Scan() {
			var e jsEvent
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				e = jsEvent{Ev: "error", Error: fmt.Sprintf("mapclient.js wrote %q: %v", sc.Bytes(), err)}
			}
			j.events <- e
		}
	}()
	t.Cleanup(func() {
		// Closing stdin ends the script; then drain what it still says.
		_ = stdin.Close()
		timer := time.AfterFunc(waitTimeout, func() { _ = cmd.Process.Kill() })
		defer timer.Stop()
		for range j.events {
		}
		<-read
		if err := cmd.Wait(); err != nil {
			t.Errorf("mapclient.js: %v", err)
		}
	})
	j.await(func(e jsEvent) bool { return e.Ev == "ready" })
	return j
}

// send sends a command.
func (j *js) send(cmd map[string]any) {
	j.t.Helper()
	b, err := json.Marshal(cmd)
	if err != nil {
		j.t.Fatal(err)
	}
	if _, err := j.stdin.Write(append(b, '\n')); err != nil {
		j.t.Fatalf("send %s: %v", b, err)
	}
}

// await returns the first event that matches, leaving the others, in
// order, for later.
func (j *js) await(match func(jsEvent) bool) jsEvent {
	j.t.Helper()
	for i, e := range j.backlog {
		if match(e) {
			j.backlog = append(j.backlog[:i:i], j.backlog[i+1:]...)
			return e
		}
	}
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		select {
		case e, ok := <-j.events:
			if !ok {
				j.t.Fatalf("mapclient.js ended while waiting; unmatched: %v", j.backlog)
			}
			if match(e) {
				return e
			}
			j.backlog = append(j.backlog, e)
		case <-timer.C:
			j.t.Fatalf("no matching event within %v; unmatched: %v", waitTimeout, j.backlog)
		}
	}
}

// take removes and returns the events received so far that match.
func (j *js) take(match func(jsEvent) bool) []jsEvent {
drain:
	for {
		select {
		case e, ok := <-j.events:
			if !ok {
				break drain
			}
			j.backlog = append(j.backlog, e)
		default:
			break drain
		}
	}
	var out, rest []jsEvent
	for _, e := range j.backlog {
		if match(e) {
			out = append(out, e)
		} else {
			rest = append(rest, e)
		}
	}
	j.backlog = rest
	return out
}

// connect connects (or reconnects) client to a node's WebSocket endpoint and
// waits until it is connected.
func (j *js) connect(client, url string) {
	j.t.Helper()
	j.send(map[string]any{"op": "connect", "client": client, "url": url})
	j.await(func(e jsEvent) bool { return e.Ev == "connected" && e.Client == client })
}

// subscribe subscribes client to a map channel and returns its subscribed
// and sync events (the state it received).
func (j *js) subscribe(client, channel string) (subscribed, sync jsEvent) {
	j.t.Helper()
	j.send(map[string]any{"op": "subscribe", "client": client, "channel": channel})
	subscribed = j.await(func(e jsEvent) bool { return e.Ev == "subscribed" && e.Client == client && e.Channel == channel })
	sync = j.await(func(e jsEvent) bool { return e.Ev == "sync" && e.Client == client && e.Channel == channel })
	return subscribed, sync
}

// awaitUpdate waits for client's update of key at offset.
func (j *js) awaitUpdate(client, channel, key string, offset uint64) jsEvent {
	j.t.Helper()
	return j.await(func(e jsEvent) bool {
		return e.Ev == "update" && e.Client == client && e.Channel == channel && e.Key == key && e.Offset == offset
	})
}
