package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// The load: clients split over two nodes, each subscribed to perClient of
// loadKeys records, and loadUpdates writes spread evenly over the records.
// It takes a few seconds on two cores, under the race detector too, so the
// race detector runs the full load as well.
const (
	loadClients = 200
	loadKeys    = 100
	loadUpdates = 2000
	perClient   = 10
)

// TestLoad writes every record one version at a time through alternating
// nodes, each version once every subscriber has the one before (a record
// updated faster than it is delivered is pushed at its latest version, so
// intermediate ones may be skipped by design). Every client must receive
// every version of its records, in order, exactly once. The delivery latency,
// from sending the set to receiving the push, is logged, never asserted.
// Not parallel: it measures.
func TestLoad(t *testing.T) {
	nClients, nKeys, nUpdates := loadClients, loadKeys, loadUpdates
	versions := int64(nUpdates / nKeys) // per record, after version 1
	subsPerKey := nClients * perClient / nKeys
	schema := pgtest.Schema(t)
	nodes := []*node{startNode(t, schema), startNode(t, schema)}

	keyName := func(k int) string { return fmt.Sprintf("load/k%03d", k) }
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for k := range nKeys {
		if err := nodes[0].store.Set(ctx, keyName(k), 1, map[string]any{"n": 1}); err != nil {
			t.Fatal(err)
		}
	}

	lt := &loadTest{
		t:       t,
		final:   1 + versions,
		keys:    make([]*loadKey, nKeys),
		byName:  make(map[string]int, nKeys),
		done:    make(chan struct{}),
		pending: nKeys,
	}
	for k := range lt.keys {
		lt.keys[k] = &loadKey{version: 1}
		lt.byName[keyName(k)] = k
	}

	// Client i subscribes to records i*perClient ... (mod nKeys): the
	// clients of a record are i, i+nKeys/perClient, ..., which alternate
	// between the nodes.
	subscribed := sync.WaitGroup{}
	for i := range nClients {
		n := nodes[(i/(nKeys/perClient))%2]
		conn, _, err := websocket.Dial(ctx, n.ws, nil)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetReadLimit(-1)
		lc := &loadClient{lt: lt, conn: conn, last: make(map[int]int64), readDone: make(chan struct{})}
		lt.clients = append(lt.clients, lc)
		t.Cleanup(func() {
			conn.CloseNow()
			<-lc.readDone
		})
		subscribed.Add(perClient)
		lc.subscribed = subscribed.Done
		mine := make([]int, perClient)
		for j := range mine {
			mine[j] = (i*perClient + j) % nKeys
			lc.last[mine[j]] = 0
		}
		go lc.read()
		for _, k := range mine {
			lc.write(ctx, map[string]any{"type": "subscribe", "key": keyName(k)})
		}
	}
	waitGroup(t, &subscribed, "subscriptions")

	start := time.Now()
	for k := range nKeys {
		lt.next(k, 2)
	}
	select {
	case <-lt.done:
	case <-ctx.Done():
		lt.mu.Lock()
		t.Fatalf("%d of %d records not done in time; failures: %v", lt.pending, nKeys, lt.failures)
	}
	elapsed := time.Since(start)

	lt.mu.Lock()
	defer lt.mu.Unlock()
	for _, f := range lt.failures {
		t.Error(f)
	}
	want := int(versions) * nKeys * subsPerKey
	if len(lt.latencies) != want {
		t.Errorf("%d deliveries, want %d", len(lt.latencies), want)
	}
	slices.Sort(lt.latencies)
	pct := func(p float64) time.Duration { return lt.latencies[int(p*float64(len(lt.latencies)-1))] }
	t.Logf("%d clients on 2 nodes, %d records, %d updates, %d deliveries in %v",
		nClients, nKeys, nUpdates, len(lt.latencies), elapsed.Round(time.Millisecond))
	t.Logf("delivery latency: p50 %v, p99 %v, max %v", pct(0.50), pct(0.99), lt.latencies[len(lt.latencies)-1])
}

type loadTest struct {
	t       *testing.T
	final   int64
	clients []*loadClient
	keys    []*loadKey
	byName  map[string]int
	done    chan struct{}

	mu        sync.Mutex
	pending   int // records not at their final version everywhere
	latencies []time.Duration
	failures  []string
}

// A loadKey is the version of a record being delivered.
type loadKey struct {
	mu        sync.Mutex
	version   int64
	sentAt    time.Time
	remaining int // subscribers still to receive it
}

func (lt *loadTest) fail(format string, args ...any) {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	if len(lt.failures) < 20 {
		lt.failures = append(lt.failures, fmt.Sprintf(format, args...))
	}
}

// next writes version v of record k, through a client chosen in turn.
func (lt *loadTest) next(k int, v int64) {
	lk := lt.keys[k]
	nClients := len(lt.clients)
	lk.mu.Lock()
	lk.version = v
	lk.remaining = nClients * perClient / len(lt.keys)
	lk.sentAt = time.Now()
	lk.mu.Unlock()
	writer := lt.clients[(k*7+int(v))%nClients]
	writer.write(context.Background(), map[string]any{
		"type": "set", "key": fmt.Sprintf("load/k%03d", k), "version": v, "value": map[string]any{"n": v}})
}

// delivered counts a push of version v of record k.
func (lt *loadTest) delivered(k int, v int64, at time.Time) {
	lk := lt.keys[k]
	lk.mu.Lock()
	if v != lk.version {
		lk.mu.Unlock()
		lt.fail("record %d: pushed version %d while version %d is being written", k, v, lk.version)
		return
	}
	latency := at.Sub(lk.sentAt)
	lk.remaining--
	complete := lk.remaining == 0
	lk.mu.Unlock()

	lt.mu.Lock()
	lt.latencies = append(lt.latencies, latency)
	if complete && v == lt.final {
		lt.pending--
		if lt.pending == 0 {
			close(lt.done)
		}
	}
	lt.mu.Unlock()
	if complete && v < lt.final {
		lt.next(k, v+1)
	}
}

type loadClient struct {
	lt         *loadTest
	conn       *websocket.Conn
	subscribed func()
	readDone   chan struct{}
	last       map[int]int64 // version received per record, by the read goroutine
}

func (lc *loadClient) write(ctx context.Context, v map[string]any) {
	data, _ := json.Marshal(v)
	if err := lc.conn.Write(ctx, websocket.MessageText, data); err != nil {
		lc.lt.fail("write: %v", err)
	}
}

func (lc *loadClient) read() {
	defer close(lc.readDone)
	for {
		_, data, err := lc.conn.Read(context.Background())
		if err != nil {
			return
		}
		at := time.Now()
		var m message
		if err := json.Unmarshal(data, &m); err != nil {
			lc.lt.fail("bad message %q: %v", data, err)
			continue
		}
		switch m.Type {
		case "ok":
			if m.Version == 0 { // the reply to a subscribe
				lc.subscribed()
			}
		case "record":
			k, ok := lc.lt.byName[m.Key]
			prev, subscribed := lc.last[k]
			if !ok || !subscribed {
				lc.lt.fail("pushed %s, which the client did not subscribe to", m.Key)
				continue
			}
			if m.Version != prev+1 {
				lc.lt.fail("%s: pushed version %d after %d", m.Key, m.Version, prev)
			}
			lc.last[k] = m.Version
			if m.Version > 1 { // 1 is the state sent on subscribing
				lc.lt.delivered(k, m.Version, at)
			}
		default:
			lc.lt.fail("unexpected %v", m)
		}
	}
}

// waitGroup waits for wg, failing the test after waitTimeout.
func waitGroup(t *testing.T, wg *sync.WaitGroup, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		t.Fatalf("%s not complete after %v", what, waitTimeout)
	}
}

// TestBurstOrder writes records as fast as the nodes take them, every set
// sent without waiting for the one before: pushes may then skip versions, but
// every client must see the versions of a record only grow, never twice, and
// end at the last one.
func TestBurstOrder(t *testing.T) {
	t.Parallel()
	const keys, versions, watchers = 10, 40, 6
	schema := pgtest.Schema(t)
	nodes := []*node{startNode(t, schema), startNode(t, schema)}
	var cs []*wsClient
	for i := range watchers {
		c := dial(t, nodes[i%2].ws)
		c.requestOK(map[string]any{"type": "subscribe", "table": "burst"})
		cs = append(cs, c)
	}
	// Each node writes half of the records.
	writers := []*wsClient{dial(t, nodes[0].ws), dial(t, nodes[1].ws)}
	for v := 1; v <= versions; v++ {
		for k := range keys {
			writers[k%2].send(map[string]any{"type": "set", "key": fmt.Sprintf("burst/%d", k), "version": v, "value": v})
		}
	}
	for _, w := range writers {
		for range keys / 2 * versions {
			if m := w.next(); m.Type != "ok" {
				t.Fatalf("got %v, want ok", m)
			}
		}
	}
	for i, c := range cs {
		last := make(map[string]int64)
		for done := 0; done < keys; {
			m := c.next()
			if m.Type != "record" {
				t.Fatalf("client %d: unexpected %v", i, m)
			}
			if m.Version <= last[m.Key] {
				t.Fatalf("client %d: %s pushed at version %d after %d", i, m.Key, m.Version, last[m.Key])
			}
			last[m.Key] = m.Version
			if m.Version == versions {
				done++
			}
		}
	}
}
