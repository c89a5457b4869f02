package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestProtocol(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	c := dial(t, n.ws)

	// Subscribing to a key sends its state, then the reply.
	c.send(map[string]any{"type": "subscribe", "id": "s1", "key": "cars/bmw"})
	if m := c.next(); m.Type != "deleted" || m.Key != "cars/bmw" {
		t.Fatalf("got %v, want the state of a missing record", m)
	}
	if m := c.next(); m.Type != "ok" || string(m.ID) != `"s1"` || m.Key != "cars/bmw" {
		t.Fatalf("got %v, want ok for s1", m)
	}

	// A write is acknowledged with its version and pushed to subscribers.
	c.send(map[string]any{"type": "set", "id": 7, "key": "cars/bmw", "version": 1, "value": map[string]any{"color": "red"}})
	if m := c.await(func(m message) bool { return m.Type == "ok" }); string(m.ID) != "7" || m.Version != 1 {
		t.Fatalf("got %v, want ok for id 7 (a number id echoed as a number) at version 1", m)
	}
	if m := c.awaitRecord("cars/bmw", 1); !sameJSON(t, m.Value, []byte(`{"color":"red"}`)) {
		t.Fatalf("pushed %s", m.Value)
	}

	// Subscribing to a key with a record sends the record.
	other := dial(t, n.ws)
	other.send(map[string]any{"type": "subscribe", "key": "cars/bmw"})
	if m := other.next(); m.Type != "record" || m.Version != 1 || !sameJSON(t, m.Value, []byte(`{"color":"red"}`)) {
		t.Fatalf("got %v, want the record", m)
	}
	other.await(func(m message) bool { return m.Type == "ok" })

	// A table subscription receives every record of the table.
	c.requestOK(map[string]any{"type": "subscribe", "table": "cars"})
	c.requestOK(map[string]any{"type": "set", "key": "cars/audi", "version": 4, "value": []int{1, 2}})
	c.awaitRecord("cars/audi", 4)
	c.requestOK(map[string]any{"type": "set", "key": "cars/bmw", "version": 2, "value": map[string]any{"color": "blue"}})
	c.awaitRecord("cars/bmw", 2)
	other.awaitRecord("cars/bmw", 2)

	// list returns the records of a table in id order; a table that was
	// never written is empty.
	m := c.request(map[string]any{"type": "list", "table": "cars"})
	if m.Type != "records" || m.Table != "cars" || len(m.Records) != 2 || m.Truncated {
		t.Fatalf("got %v, want the 2 records of cars", m)
	}
	if r := m.Records[0]; r.Key != "cars/audi" || r.Version != 4 || !sameJSON(t, r.Value, []byte(`[1,2]`)) {
		t.Fatalf("first record %+v", r)
	}
	if r := m.Records[1]; r.Key != "cars/bmw" || r.Version != 2 {
		t.Fatalf("second record %+v", r)
	}
	if m := c.request(map[string]any{"type": "list", "table": "nothing here yet"}); m.Type != "records" || len(m.Records) != 0 {
		t.Fatalf("got %v, want no records", m)
	}

	// A delete is pushed as such.
	c.requestOK(map[string]any{"type": "delete", "key": "cars/audi"})
	c.awaitDeleted("cars/audi")
	if _, _, found := stored(t, n, n.schema(), "cars", "audi"); found {
		t.Fatal("deleted record still stored")
	}

	// Keys may hold any character; the table is the text before the first "/".
	odd := `cars/it's "odd"; DROP TABLE cars; -- /ü/`
	c.requestOK(map[string]any{"type": "set", "key": odd, "version": 1, "value": "x"})
	c.awaitRecord(odd, 1)

	// After unsubscribing, changes of the key are no longer pushed. A later
	// write of a key on the same shard is pushed after it would have been.
	other.requestOK(map[string]any{"type": "unsubscribe", "key": "cars/bmw"})
	sentinel := sameShard(n.srv, "cars/bmw", "sentinel/")
	other.requestOK(map[string]any{"type": "subscribe", "key": sentinel})
	other.awaitDeleted(sentinel)
	c.requestOK(map[string]any{"type": "set", "key": "cars/bmw", "version": 3, "value": 3})
	c.requestOK(map[string]any{"type": "set", "key": sentinel, "version": 1, "value": 1})
	if m := other.next(); m.Type != "record" || m.Key != sentinel {
		t.Fatalf("got %v, want only the sentinel's record after unsubscribing", m)
	}
}

// sameShard returns a key that starts with prefix and that the server hands
// to the same shard as key, so that their pushes keep the order of their
// commits.
func sameShard(s *Server, key, prefix string) string {
	want := maphash.String(s.seed, key) % shards
	for i := 0; ; i++ {
		k := fmt.Sprintf("%s%d", prefix, i)
		if maphash.String(s.seed, k)%shards == want {
			return k
		}
	}
}

// schema returns the node's schema, for reading PostgreSQL directly.
func (s *node) schema() string { return s.srv.storage.(PGStore).Schema() }

func TestTwoNodes(t *testing.T) {
	t.Parallel()
	schema := pgtest.Schema(t)
	a, b := startNode(t, schema), startNode(t, schema)
	ca, cb := dial(t, a.ws), dial(t, b.ws)

	cb.requestOK(map[string]any{"type": "subscribe", "table": "demo"})
	ca.requestOK(map[string]any{"type": "subscribe", "key": "demo/x"})
	ca.awaitDeleted("demo/x")

	// A write through A reaches B's client, and one through B reaches A's.
	ca.requestOK(map[string]any{"type": "set", "key": "demo/x", "version": 1, "value": map[string]any{"by": "a"}})
	if m := cb.awaitRecord("demo/x", 1); !sameJSON(t, m.Value, []byte(`{"by":"a"}`)) {
		t.Fatalf("B pushed %s", m.Value)
	}
	cb.requestOK(map[string]any{"type": "set", "key": "demo/x", "version": 2, "value": map[string]any{"by": "b"}})
	if m := ca.awaitRecord("demo/x", 2); !sameJSON(t, m.Value, []byte(`{"by":"b"}`)) {
		t.Fatalf("A pushed %s", m.Value)
	}
	cb.awaitRecord("demo/x", 2)

	// So do deletes, and records new to a subscribed table.
	ca.requestOK(map[string]any{"type": "set", "key": "demo/y", "version": 1, "value": true})
	cb.awaitRecord("demo/y", 1)
	ca.requestOK(map[string]any{"type": "delete", "key": "demo/x"})
	cb.awaitDeleted("demo/x")
	ca.awaitDeleted("demo/x")

	// B's refusal of a stale write counts what A wrote.
	m := cb.request(map[string]any{"type": "set", "key": "demo/y", "version": 1, "value": false})
	if m.Type != "error" || m.Code != codeStaleVersion || m.Version != 1 {
		t.Fatalf("got %v, want stale_version at 1", m)
	}
}

func TestStaleSetRefused(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "set", "key": "docs/a", "version": 3, "value": map[string]any{"v": 3}})
	for _, version := range []int64{2, 3} {
		m := c.request(map[string]any{"type": "set", "key": "docs/a", "version": version, "value": map[string]any{"v": "stale"}})
		if m.Type != "error" || m.Code != codeStaleVersion || m.Key != "docs/a" || m.Version != 3 {
			t.Fatalf("set at version %d: got %v, want stale_version naming the stored version 3", version, m)
		}
	}
	version, value, found := stored(t, n, n.schema(), "docs", "a")
	if !found || version != 3 || !sameJSON(t, value, []byte(`{"v":3}`)) {
		t.Fatalf("stored %d %s %v, want version 3 unchanged", version, value, found)
	}
	// A deleted record starts again from any version.
	c.requestOK(map[string]any{"type": "delete", "key": "docs/a"})
	c.requestOK(map[string]any{"type": "set", "key": "docs/a", "version": 1, "value": 1})
}

// TestResyncPushesState makes the change feed lose events: records change
// without a notification, then the LISTEN connection is killed. The Resync
// that follows its reconnection must bring clients up to date.
func TestResyncPushesState(t *testing.T) {
	t.Parallel()
	schema := pgtest.Schema(t)
	n := startNode(t, schema, pgstore.WithoutChangeLog()) // the NOTIFY feed, whose loss costs a Resync
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "set", "key": "demo/a", "version": 1, "value": "one"})
	c.requestOK(map[string]any{"type": "subscribe", "key": "demo/a"})
	c.awaitRecord("demo/a", 1)
	c.requestOK(map[string]any{"type": "subscribe", "table": "demo"})

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// In replica mode, ordinary triggers (pgstore's NOTIFY among them) do
	// not fire: these changes are lost to the feed.
	table := pgx.Identifier{schema, "demo"}.Sanitize()
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		for _, sql := range []string{
			"SET LOCAL session_replication_role = replica",
			"UPDATE " + table + ` SET version = 2, val = '"two"' WHERE id = 'a'`,
			"INSERT INTO " + table + ` (id, version, val) VALUES ('b', 5, '"new"')`,
		} {
			if _, err := tx.Exec(ctx, sql); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// The listener's last statement is its LISTEN on the schema's channel.
	var killed int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query = $1) k`, "LISTEN "+pgx.Identifier{schema}.Sanitize()).Scan(&killed)
	if err != nil {
		t.Fatal(err)
	}
	if killed != 1 {
		t.Fatalf("terminated %d listeners, want 1", killed)
	}
	if m := c.awaitRecord("demo/a", 2); !sameJSON(t, m.Value, []byte(`"two"`)) {
		t.Fatalf("pushed %s", m.Value)
	}
	c.awaitRecord("demo/b", 5)

	// The feed works again.
	c.requestOK(map[string]any{"type": "set", "key": "demo/a", "version": 3, "value": "three"})
	c.awaitRecord("demo/a", 3)
}

func TestBadMessages(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	c := dial(t, n.ws)
	long := strings.Repeat("t", 64)
	big := `"` + strings.Repeat("x", defaultMaxValueBytes) + `"`
	for _, tc := range []struct {
		msg, code, id string
	}{
		{`not json`, codeBadMessage, ""},
		{`[1, 2]`, codeBadMessage, ""},
		{`{}`, codeBadMessage, ""},
		{`{"type": "nope", "id": "u1"}`, codeUnknownType, `"u1"`},
		{`{"type": "subscribe", "id": {"x": 1}, "key": "a/b"}`, codeBadMessage, ""},
		{`{"type": "subscribe", "id": "k1", "key": "no-slash"}`, codeBadKey, `"k1"`},
		{`{"type": "subscribe", "id": "k2", "key": "/id"}`, codeBadKey, `"k2"`},
		{`{"type": "subscribe", "id": "k3", "key": "table/"}`, codeBadKey, `"k3"`},
		{`{"type": "subscribe", "id": "k4", "key": "` + long + `/id"}`, codeBadKey, `"k4"`},
		{`{"type": "subscribe", "id": "k5", "key": "t/a\u0000b"}`, codeBadKey, `"k5"`},
		{`{"type": "subscribe", "id": "k6", "key": "t/` + strings.Repeat("i", 2693) + `"}`, codeBadKey, `"k6"`},
		{`{"type": "subscribe", "id": "k7"}`, codeBadKey, `"k7"`},
		{`{"type": "subscribe", "id": "k8", "key": "a/b", "table": "a"}`, codeBadMessage, `"k8"`},
		{`{"type": "list", "id": "t1", "table": "a/b"}`, codeBadTable, `"t1"`},
		{`{"type": "list", "id": "t2"}`, codeBadTable, `"t2"`},
		{`{"type": "set", "id": "v1", "key": "a/b", "value": 1}`, codeBadMessage, `"v1"`},
		{`{"type": "set", "id": "v2", "key": "a/b", "version": 0, "value": 1}`, codeBadMessage, `"v2"`},
		{`{"type": "set", "id": "v3", "key": "a/b", "version": "1", "value": 1}`, codeBadMessage, `"v3"`},
		{`{"type": "set", "id": "v4", "key": "a/b", "version": 1}`, codeBadValue, `"v4"`},
		{`{"type": "set", "id": "v5", "key": "a/b", "version": 1, "value": null}`, codeBadValue, `"v5"`},
		{`{"type": "set", "id": "v6", "key": "a/b", "version": 1, "value": "\u0000"}`, codeBadValue, `"v6"`},
		{`{"type": "set", "id": "v7", "key": "a/b", "version": 1, "value": ` + big + `}`, codeTooLarge, `"v7"`},
		{`{"type": "delete", "id": "d1", "key": "nothing"}`, codeBadKey, `"d1"`},
	} {
		c.sendRaw(tc.msg)
		m := c.next()
		if m.Type != "error" || m.Code != tc.code || string(m.ID) != tc.id || m.Message == "" {
			t.Errorf("%.80s: got %v, want error %s with id %s", tc.msg, m, tc.code, tc.id)
		}
	}
	// Binary messages are refused too.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := c.conn.Write(ctx, websocket.MessageBinary, []byte(`{"type":"list","table":"a"}`)); err != nil {
		t.Fatal(err)
	}
	if m := c.next(); m.Type != "error" || m.Code != codeBadMessage {
		t.Errorf("binary message: got %v, want bad_message", m)
	}
	// None of it was written, and the connection carries on.
	if m := c.request(map[string]any{"type": "list", "table": "a"}); m.Type != "records" || len(m.Records) != 0 {
		t.Fatalf("got %v, want no records", m)
	}

	// A message over the read limit ends that connection only.
	c.sendTooBig(`{"type": "set", "key": "a/b", "version": 1, "value": "` + strings.Repeat("x", int(n.srv.limits.readLimit())) + `"}`)
	dial(t, n.ws).requestOK(map[string]any{"type": "subscribe", "table": "a"})
}

func TestPage(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	resp, body := httpGet(t, n.url)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") || string(body) != string(indexHTML) {
		t.Fatalf("GET / = %d %q, %d bytes", resp.StatusCode, resp.Header.Get("Content-Type"), len(body))
	}
	// Nothing on the page comes from elsewhere.
	for _, s := range []string{"http://", "https://", "//cdn", "src="} {
		if strings.Contains(string(body), s) {
			t.Errorf("page holds %q", s)
		}
	}
	if resp, _ = httpGet(t, n.http.URL+"/nothing"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /nothing = %d", resp.StatusCode)
	}
}

// TestAbruptDisconnects checks that clients that vanish without a close
// handshake, some in the middle of a message, leave no goroutine behind on a
// server that keeps running. Not parallel: it counts goroutines.
func TestAbruptDisconnects(t *testing.T) {
	n := startNode(t, pgtest.Schema(t))
	watcher := dial(t, n.ws)
	watcher.requestOK(map[string]any{"type": "subscribe", "table": "t"}) // starts the feed
	ignore := goleak.IgnoreCurrent()

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for i := range 30 {
		conn, _, err := websocket.Dial(ctx, n.ws, nil)
		if err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("t/%d", i)
		if err := conn.Write(ctx, websocket.MessageText, []byte(`{"type":"subscribe","key":"`+key+`"}`)); err != nil {
			t.Fatal(err)
		}
		for range 2 { // the state, then the reply
			if _, _, err := conn.Read(ctx); err != nil {
				t.Fatal(err)
			}
		}
		switch i % 3 {
		case 1: // with pushes on their way
			if err := conn.Write(ctx, websocket.MessageText, []byte(`{"type":"set","key":"`+key+`","version":1,"value":1}`)); err != nil {
				t.Fatal(err)
			}
		case 2: // half-way through a message
			w, err := conn.Writer(ctx, websocket.MessageText)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write([]byte(`{"type":"set","key":"`)); err != nil {
				t.Fatal(err)
			}
		}
		if err := conn.CloseNow(); err != nil && !errors.Is(err, context.Canceled) {
			t.Logf("close: %v", err)
		}
	}
	pgtest.WaitForAsyncCloses()
	goleak.VerifyNone(t, ignore)
	n.srv.mu.Lock()
	clients, keys := len(n.srv.clients), len(n.srv.keys)
	n.srv.mu.Unlock()
	if clients != 1 || keys != 0 {
		t.Errorf("server holds %d clients and %d key subscriptions, want only the watcher's", clients, keys)
	}
	// The server carries on.
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "set", "key": "t/after", "version": 1, "value": 1})
	watcher.awaitRecord("t/after", 1)
}

// TestClose checks that closing a server ends its connections with status
// 1001 (going away) and refuses new ones, and may be called again.
func TestClose(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "subscribe", "key": "a/b"})
	if err := n.srv.Close(); err != nil {
		t.Fatal(err)
	}
	// The server completes the close handshake with 1001; the client
	// library now and then reports the end as EOF instead of the status,
	// so a status, when there is one, must be 1001.
	err := c.closed()
	if status := websocket.CloseStatus(err); status != -1 && status != websocket.StatusGoingAway {
		t.Fatalf("connection ended with %v, want status 1001", err)
	}
	if err == nil {
		t.Fatal("connection still open after Close")
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	_, resp, err := websocket.Dial(ctx, n.ws, nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("dial after Close: %v, %v; want 503", resp, err)
	}
	if err := n.srv.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestWithTheChangeLogALostListenConnectionLosesNothing kills the LISTEN
// connection of a node that follows the change log while another node
// writes: its clients get the change from the log, with its value, and no
// Resync is needed.
func TestWithTheChangeLogALostListenConnectionLosesNothing(t *testing.T) {
	t.Parallel()
	schema := pgtest.Schema(t)
	writer := startNode(t, schema, pgstore.WithChangeLog(time.Hour))
	reader := startNode(t, schema)
	w, r := dial(t, writer.ws), dial(t, reader.ws)
	w.requestOK(map[string]any{"type": "set", "key": "demo/a", "version": 1, "value": "one"})
	r.requestOK(map[string]any{"type": "subscribe", "key": "demo/a"})
	r.awaitRecord("demo/a", 1)

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	sum := sha256.Sum256([]byte(schema))
	channel := "pgstore_log_" + hex.EncodeToString(sum[:12])
	var killed int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query = $1) k`, "LISTEN "+pgx.Identifier{channel}.Sanitize()).Scan(&killed)
	if err != nil {
		t.Fatal(err)
	}
	if killed != 1 {
		t.Fatalf("terminated %d listeners, want 1", killed)
	}
	w.requestOK(map[string]any{"type": "set", "key": "demo/a", "version": 2, "value": "two"})
	if m := r.awaitRecord("demo/a", 2); !sameJSON(t, m.Value, []byte(`"two"`)) {
		t.Fatalf("pushed %s", m.Value)
	}
}

func TestValueLimit(t *testing.T) {
	t.Parallel()
	n := startNodeLimits(t, pgtest.Schema(t), Limits{MaxValueBytes: 100})
	c := dial(t, n.ws)
	value := func(size int) string { return `"` + strings.Repeat("x", size-2) + `"` } // of size bytes of JSON
	c.sendRaw(`{"type": "set", "id": "at", "key": "v/a", "version": 1, "value": ` + value(100) + `}`)
	if m := c.next(); m.Type != "ok" {
		t.Fatalf("value at the limit: got %v, want ok", m)
	}
	c.sendRaw(`{"type": "set", "id": "over", "key": "v/a", "version": 2, "value": ` + value(101) + `}`)
	if m := c.next(); m.Type != "error" || m.Code != codeTooLarge || string(m.ID) != `"over"` || m.Key != "v/a" ||
		m.Message != "value is 101 bytes, over the limit of 100" {
		t.Fatalf("value over the limit: got %v, want too_large naming the limit", m)
	}
	if version, _, _ := stored(t, n, n.schema(), "v", "a"); version != 1 {
		t.Fatalf("stored version %d, want 1: the value over the limit was written", version)
	}
	// The read limit follows: a message up to 32 KiB over the value limit
	// is answered, a longer one, which the default limit would let
	// through, ends the connection.
	c.sendRaw(`{"type": "set", "id": "near", "key": "v/b", "version": 1, "value": ` + value(100+30<<10) + `}`)
	if m := c.next(); m.Code != codeTooLarge || string(m.ID) != `"near"` {
		t.Fatalf("message under the read limit: got %v, want too_large", m)
	}
	c.sendTooBig(`{"type": "set", "key": "v/b", "version": 1, "value": ` + value(40<<10) + `}`)
}

func TestSubscriptionLimit(t *testing.T) {
	t.Parallel()
	n := startNodeLimits(t, pgtest.Schema(t), Limits{MaxSubscriptions: 2})
	c := dial(t, n.ws)
	c.requestOK(map[string]any{"type": "subscribe", "key": "s/1"})
	c.requestOK(map[string]any{"type": "subscribe", "table": "s"})
	m := c.request(map[string]any{"type": "subscribe", "key": "s/2"})
	if m.Type != "error" || m.Code != codeTooMany || m.Key != "s/2" || !strings.Contains(m.Message, "at most 2 subscriptions") {
		t.Fatalf("third subscription: got %v, want too_many naming the limit", m)
	}
	n.srv.mu.Lock()
	left := len(n.srv.keys["s/2"])
	n.srv.mu.Unlock()
	if left != 0 {
		t.Fatal("the refused subscription is held")
	}
	// Subscribing again to what a client holds takes no more.
	c.requestOK(map[string]any{"type": "subscribe", "key": "s/1"})
	// Room made by unsubscribing can be used.
	c.requestOK(map[string]any{"type": "unsubscribe", "table": "s"})
	c.requestOK(map[string]any{"type": "subscribe", "key": "s/2"})
	if m := c.request(map[string]any{"type": "subscribe", "table": "s"}); m.Code != codeTooMany {
		t.Fatalf("third subscription: got %v, want too_many", m)
	}
}

// TestMessageRateLimit sends many sets at once: a second's worth go through,
// and the rest, refused, are not written.
func TestMessageRateLimit(t *testing.T) {
	t.Parallel()
	const perSecond, sent = 3, 40
	n := startNodeLimits(t, pgtest.Schema(t), Limits{MessagesPerSecond: perSecond})
	c := dial(t, n.ws)
	for i := range sent {
		c.send(map[string]any{"type": "set", "id": i, "key": fmt.Sprintf("r/%d", i), "version": 1, "value": i})
	}
	limited := 0
	for i := range sent {
		m := c.await(func(m message) bool { return string(m.ID) == fmt.Sprint(i) })
		_, _, written := stored(t, n, n.schema(), "r", fmt.Sprint(i))
		switch {
		case m.Type == "ok" && written:
		case i >= perSecond && m.Type == "error" && m.Code == codeRateLimited && m.Key == fmt.Sprintf("r/%d", i) && !written:
			if want := "over the limit of 3 messages a second"; !strings.Contains(m.Message, want) {
				t.Errorf("message %q, want it to hold %q", m.Message, want)
			}
			limited++
		default:
			t.Fatalf("set %d: got %v, written: %v; want ok and written, or (after the first %d) rate_limited and not written", i, m, written, perSecond)
		}
	}
	// Sets take far less than the (sent-perSecond)/perSecond seconds that
	// would let all through.
	if limited == 0 {
		t.Fatalf("all %d sets went through", sent)
	}
	// The rate refills the allowance: after half a second, one and a half
	// messages' worth.
	time.Sleep(500 * time.Millisecond)
	c.requestOK(map[string]any{"type": "set", "key": "r/after", "version": 1, "value": 1})
}
