package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestMain(m *testing.M) {
	// Find the server first: a test container's own goroutines (its
	// reaper) are not leaks. Without a server the tests skip themselves.
	_, _ = pgtest.Find()
	ignore := goleak.IgnoreCurrent()
	code := m.Run()
	if code == 0 {
		pgtest.WaitForAsyncCloses() // the connections that clients' departures cancelled
		if err := goleak.Find(ignore); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// waitTimeout bounds every wait for a message: reaching it fails the test.
// It is generous because the machine may be busy with other tests.
const waitTimeout = 30 * time.Second

// A node is a server on a connector of its own, served on loopback.
type node struct {
	store *pgstore.Connector
	srv   *Server
	http  *httptest.Server
	url   string // of the page
	ws    string // of the WebSocket endpoint
}

// startNode starts a node on schema; everything it holds is closed when the
// test ends.
func startNode(t testing.TB, schema string, opts ...pgstore.Option) *node {
	t.Helper()
	return startNodeLimits(t, schema, Limits{}, opts...)
}

// startNodeLimits is startNode with limits for its clients.
func startNodeLimits(t testing.TB, schema string, limits Limits, opts ...pgstore.Option) *node {
	t.Helper()
	return startNodeURL(t, pgtest.URL(t), schema, limits, opts...)
}

// startNodeURL is startNodeLimits on the server at url, such as a
// pgtest.Proxy's.
func startNodeURL(t testing.TB, url, schema string, limits Limits, opts ...pgstore.Option) *node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	// The default pool (4 connections here) would make the load test
	// measure waits for a connection.
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 16
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store, err := pgstore.New(ctx, pool,
		append([]pgstore.Option{pgstore.WithSchema(schema), pgstore.WithVersionGuard(true), pgstore.WithLogger(logger)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		if err := store.Close(ctx); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	srv := NewServer(PGStore{store}, limits, logger)
	t.Cleanup(func() { srv.Close() })
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return &node{store: store, srv: srv, http: hs, url: hs.URL + "/", ws: "ws" + strings.TrimPrefix(hs.URL, "http") + "/ws"}
}

// A message is any message of the server.
type message struct {
	Type      string          `json:"type"`
	ID        json.RawMessage `json:"id"`
	Key       string          `json:"key"`
	Table     string          `json:"table"`
	Version   int64           `json:"version"`
	Value     json.RawMessage `json:"value"`
	Records   []Entry         `json:"records"`
	Truncated bool            `json:"truncated"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
}

func (m message) String() string {
	b, _ := json.Marshal(m)
	return string(b)
}

// A wsClient is a test's WebSocket connection. Messages are read on a
// goroutine of their own and taken in order with next or await.
type wsClient struct {
	t       testing.TB
	conn    *websocket.Conn
	msgs    chan message
	readErr error // set when msgs is closed
	backlog []message
	ids     int
}

func dial(t testing.TB, url string) *wsClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadLimit(-1)
	c := &wsClient{t: t, conn: conn, msgs: make(chan message, 4096)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(c.msgs)
		for {
			_, data, err := conn.Read(context.Background())
			if err != nil {
				c.readErr = err
				return
			}
			var m message
			if err := json.Unmarshal(data, &m); err != nil {
				c.readErr = fmt.Errorf("server sent %q: %w", data, err)
				return
			}
			c.msgs <- m
		}
	}()
	t.Cleanup(func() {
		conn.CloseNow()
		<-done
	})
	return c
}

// sendRaw sends one text message as it is.
func (c *wsClient) sendRaw(data string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := c.conn.Write(ctx, websocket.MessageText, []byte(data)); err != nil {
		c.t.Fatalf("send %s: %v", data, err)
	}
}

func (c *wsClient) send(v map[string]any) {
	c.t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	c.sendRaw(string(data))
}

// request sends v with a fresh id and returns the reply to it; messages
// received meanwhile stay for next and await.
func (c *wsClient) request(v map[string]any) message {
	c.t.Helper()
	c.ids++
	id := fmt.Sprintf("r%d", c.ids)
	v["id"] = id
	c.send(v)
	return c.await(func(m message) bool { return string(m.ID) == `"`+id+`"` })
}

// requestOK is request that fails the test unless the reply is "ok".
func (c *wsClient) requestOK(v map[string]any) message {
	c.t.Helper()
	m := c.request(v)
	if m.Type != "ok" {
		c.t.Fatalf("%v: got %v, want ok", v, m)
	}
	return m
}

// next returns the next message.
func (c *wsClient) next() message {
	c.t.Helper()
	return c.await(func(message) bool { return true })
}

// await returns the first message that matches, leaving the others, in
// order, for later.
func (c *wsClient) await(match func(message) bool) message {
	c.t.Helper()
	for i, m := range c.backlog {
		if match(m) {
			c.backlog = append(c.backlog[:i:i], c.backlog[i+1:]...)
			return m
		}
	}
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		select {
		case m, ok := <-c.msgs:
			if !ok {
				c.t.Fatalf("connection ended while waiting: %v; unmatched: %v", c.readErr, c.backlog)
			}
			if match(m) {
				return m
			}
			c.backlog = append(c.backlog, m)
		case <-timer.C:
			c.t.Fatalf("no matching message within %v; unmatched: %v", waitTimeout, c.backlog)
		}
	}
}

// awaitRecord waits for the push of key at version.
func (c *wsClient) awaitRecord(key string, version int64) message {
	c.t.Helper()
	return c.await(func(m message) bool { return m.Type == "record" && m.Key == key && m.Version == version })
}

// awaitDeleted waits for the push of key's deletion.
func (c *wsClient) awaitDeleted(key string) message {
	c.t.Helper()
	return c.await(func(m message) bool { return m.Type == "deleted" && m.Key == key })
}

// closed waits for the connection to end and returns why.
func (c *wsClient) closed() error {
	c.t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		select {
		case m, ok := <-c.msgs:
			if !ok {
				return c.readErr
			}
			c.backlog = append(c.backlog, m)
		case <-timer.C:
			c.t.Fatalf("connection still open after %v", waitTimeout)
		}
	}
}

// sendTooBig sends a message over the server's read limit and checks that it
// ends the connection. The server may close it before the whole message is
// written, and the client library then reports the reset rather than the
// status, so a status, when there is one, must be 1009 (message too big).
func (c *wsClient) sendTooBig(data string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	writeErr := c.conn.Write(ctx, websocket.MessageText, []byte(data))
	err := c.closed()
	if status := websocket.CloseStatus(err); err == nil || status != -1 && status != websocket.StatusMessageTooBig {
		c.t.Fatalf("connection ended with %v (write: %v), want status 1009", err, writeErr)
	}
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

// stored reads a record straight from PostgreSQL, past every node.
func stored(t testing.TB, n *node, schema, table, id string) (version int64, value json.RawMessage, found bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	rows, err := n.store.Query(ctx, "SELECT version, val FROM "+pgx.Identifier{schema, table}.Sanitize()+" WHERE id = $1", id)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	if rows.Next() {
		if err := rows.Scan(&version, &value); err != nil {
			t.Fatal(err)
		}
		found = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return version, value, found
}

// httpGet gets url and returns the response with its whole body, read and
// closed.
func httpGet(t testing.TB, url string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

// newClient1 returns the server's one client that is not in old.
func newClient1(t *testing.T, n *node, old map[*client]bool) *client {
	t.Helper()
	n.srv.mu.Lock()
	defer n.srv.mu.Unlock()
	var found *client
	for c := range n.srv.clients {
		if !old[c] {
			if found != nil {
				t.Fatal("more than one new client")
			}
			found = c
		}
	}
	if found == nil {
		t.Fatal("no new client")
	}
	return found
}
