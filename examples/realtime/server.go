package main

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"maps"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/pgstore/pgstore"
)

//go:embed index.html
var indexHTML []byte

// The server's fan-out: events are handed to shards by key, so that the
// records of one key are read and pushed in order while different keys
// proceed in parallel.
const (
	shards     = 8
	shardQueue = 1024
	opTimeout  = 10 * time.Second // of one storage call
)

// A Server is one node of a realtime cluster: it serves the page at "/",
// WebSocket clients at "/ws", its metrics at "/metrics" and its health at
// "/healthz", writes through its Storage and pushes every change of a
// subscribed record to its clients, whichever node made it.
type Server struct {
	storage Storage
	limits  Limits
	log     *slog.Logger
	ctx     context.Context // ends with Close
	cancel  context.CancelFunc
	seed    maphash.Seed
	stats   *serverStats
	metrics http.Handler

	mu      sync.Mutex
	closed  bool
	clients map[*client]struct{}
	keys    map[string]map[*client]struct{} // subscribers of a key
	tables  map[string]map[*client]struct{} // subscribers of a whole table
	conns   sync.WaitGroup

	feedMu     sync.Mutex
	feed       *pgstore.Subscription // started by Start or the first subscribe
	feedClosed bool

	queues  [shards]chan job
	workers sync.WaitGroup

	setLocks [64]sync.Mutex // serialise the version check and write of a key on this node
}

// A job reads a key and pushes its state to the clients subscribed to it
// that do not have it yet.
type job struct {
	key string
	// st is the record's state as of a change of the change log, which
	// carries it; nil: read it from storage.
	st   *state
	done chan struct{} // closed when pushed, if not nil
}

// NewServer returns a server that keeps its records in storage, holds each
// client to limits and logs to logger (nil: slog.Default()). Close it to end
// every connection.
func NewServer(storage Storage, limits Limits, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		storage: storage,
		limits:  limits.withDefaults(),
		log:     logger,
		ctx:     ctx,
		cancel:  cancel,
		seed:    maphash.MakeSeed(),
		clients: make(map[*client]struct{}),
		keys:    make(map[string]map[*client]struct{}),
		tables:  make(map[string]map[*client]struct{}),
		stats:   newServerStats(),
	}
	s.metrics = newMetricsHandler(s)
	for i := range s.queues {
		s.queues[i] = make(chan job, shardQueue)
		s.workers.Add(1)
		go s.work(s.queues[i])
	}
	return s
}

// Start subscribes the node to its storage's change feed, which the first
// client subscription does otherwise: a feed that cannot start then fails at
// startup rather than at the first client, and /healthz, which reports a
// feed not started as unhealthy, can be healthy before any client came.
func (s *Server) Start(ctx context.Context) error {
	return s.startFeed(ctx)
}

// ServeHTTP serves the page at "/", the WebSocket endpoint at "/ws", the
// metrics at "/metrics" and the health at "/healthz".
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/":
		if !getOrHead(w, r) {
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-cache")
		// Nothing but this page and its WebSocket: no fetch from elsewhere.
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		w.Write(indexHTML)
	case "/ws":
		s.serveWS(w, r)
	case "/metrics":
		s.metrics.ServeHTTP(w, r)
	case "/healthz":
		s.serveHealth(w, r)
	default:
		http.NotFound(w, r)
	}
}

// getOrHead reports whether r is a GET or HEAD request, and answers 405
// if it is not.
func getOrHead(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

// Close ends every connection (with status 1001, going away) and the change
// feed, and waits for the server's goroutines to end. The storage stays open.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.conns.Wait()
	s.feedMu.Lock()
	feed := s.feed
	s.feed, s.feedClosed = nil, true
	s.feedMu.Unlock()
	if feed != nil {
		feed.Close(context.Background())
	}
	s.workers.Wait()
	return nil
}

func (s *Server) serveWS(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		http.Error(w, "server closing", http.StatusServiceUnavailable)
		return
	}
	s.conns.Add(1)
	s.mu.Unlock()
	defer s.conns.Done()

	conn, err := websocket.Accept(w, r, nil) // same origin only
	if err != nil {
		s.log.Debug("websocket handshake failed", "remote", r.RemoteAddr, "err", err)
		return
	}
	conn.SetReadLimit(s.limits.readLimit())
	c := newClient(s, conn)
	s.mu.Lock()
	s.clients[c] = struct{}{}
	s.mu.Unlock()
	s.log.Debug("client connected", "remote", r.RemoteAddr)
	c.serve()
	s.mu.Lock()
	delete(s.clients, c)
	for key := range c.keys {
		s.removeLocked(s.keys, key, c)
	}
	for table := range c.tables {
		s.removeLocked(s.tables, table, c)
	}
	s.stats.subscribed(false, -int64(len(c.keys)))
	s.stats.subscribed(true, -int64(len(c.tables)))
	s.mu.Unlock()
	s.log.Debug("client disconnected", "remote", r.RemoteAddr, "cause", context.Cause(c.ctx))
}

// subscribe adds c to the subscribers of a key (table == false) or a table,
// and makes sure the change feed runs: every change committed after it
// returns reaches c.
func (s *Server) subscribe(ctx context.Context, c *client, name string, table bool) error {
	s.mu.Lock()
	set := c.keys
	index := s.keys
	if table {
		set, index = c.tables, s.tables
	}
	if !set[name] && len(c.keys)+len(c.tables) >= s.limits.MaxSubscriptions {
		s.mu.Unlock()
		return errorf(codeTooMany, "a connection may hold at most %d subscriptions; unsubscribe from one first", s.limits.MaxSubscriptions)
	}
	if !set[name] {
		set[name] = true
		s.stats.subscribed(table, 1)
	}
	if index[name] == nil {
		index[name] = make(map[*client]struct{})
	}
	index[name][c] = struct{}{}
	s.mu.Unlock()
	switch err := s.startFeed(ctx); {
	case errors.Is(err, errClosing):
		return errorf(codeUnavailable, "server closing")
	case err != nil:
		s.log.Error("cannot subscribe to the change feed", "err", err)
		return errorf(codeUnavailable, "change feed unavailable; try again")
	}
	return nil
}

// unsubscribe removes c from the subscribers of a key or table, and forgets
// what c was sent of records no subscription covers any more.
func (s *Server) unsubscribe(c *client, name string, table bool) {
	s.mu.Lock()
	set, index := c.keys, s.keys
	if table {
		set, index = c.tables, s.tables
	}
	if set[name] {
		delete(set, name)
		s.stats.subscribed(table, -1)
	}
	s.removeLocked(index, name, c)
	keys, tables := maps.Clone(c.keys), maps.Clone(c.tables)
	s.mu.Unlock()
	c.forget(func(key string) bool { return !keys[key] && !tables[tableOf(key)] })
}

func (s *Server) removeLocked(index map[string]map[*client]struct{}, name string, c *client) {
	delete(index[name], c)
	if len(index[name]) == 0 {
		delete(index, name)
	}
}

var errClosing = errors.New("server closing")

// startFeed subscribes to the storage's changes once; Subscribe returns when
// the feed listens.
func (s *Server) startFeed(ctx context.Context) error {
	s.feedMu.Lock()
	defer s.feedMu.Unlock()
	if s.feedClosed {
		return errClosing
	}
	if s.feed != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	feed, err := s.storage.Subscribe(ctx, s.onEvent)
	if err != nil {
		return fmt.Errorf("subscribe to the change feed: %w", err)
	}
	s.feed = feed
	return nil
}

// feedStarted reports whether the change feed runs.
func (s *Server) feedStarted() bool {
	s.feedMu.Lock()
	defer s.feedMu.Unlock()
	return s.feed != nil
}

// onEvent runs on the feed's goroutine, one event at a time in commit order.
// It only queues work, so that reads of different keys overlap.
func (s *Server) onEvent(e pgstore.Event) {
	switch e.Type {
	case pgstore.Insert, pgstore.Update, pgstore.Delete:
		s.mu.Lock()
		watched := len(s.keys[e.Key]) > 0 || len(s.tables[e.Table]) > 0
		s.mu.Unlock()
		if !watched {
			return
		}
		j := job{key: e.Key}
		if e.Cursor != "" {
			// From the change log: the event carries the value, and the
			// key's jobs run in order, so no read is needed.
			j.st = &state{version: e.Version, value: e.Value, deleted: e.Type == pgstore.Delete}
		}
		s.enqueue(j)
	case pgstore.DestroyTable:
		// Its records are gone: refresh the ones clients hold.
		for _, key := range s.heldKeys(func(key string) bool { return tableOf(key) == e.Table }) {
			s.enqueue(job{key: key})
		}
	case pgstore.Resync:
		// With the change log, only when this node fell behind its
		// retention (or the log is gone): the rest of the time a lost
		// LISTEN connection costs nothing.
		s.resync()
	}
}

// resync re-reads every record a client holds or is subscribed to, and the
// records of subscribed tables, and pushes what changed while events were
// lost.
func (s *Server) resync() {
	keys := make(map[string]bool)
	for _, key := range s.heldKeys(func(string) bool { return true }) {
		keys[key] = true
	}
	s.mu.Lock()
	for key := range s.keys {
		keys[key] = true
	}
	tables := make([]string, 0, len(s.tables))
	for table := range s.tables {
		tables = append(tables, table)
	}
	s.mu.Unlock()
	if lister, ok := s.storage.(Lister); ok {
		for _, table := range tables {
			ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
			entries, err := lister.List(ctx, table, maxListRecords)
			cancel()
			if err != nil {
				s.log.Warn("resync: cannot list a table; its new records reach clients with their next change", "table", table, "err", err)
			}
			for _, e := range entries {
				keys[e.Key] = true
			}
		}
	}
	s.log.Info("change feed resynchronised: re-reading records", "records", len(keys))
	for key := range keys {
		s.enqueue(job{key: key})
	}
}

// heldKeys returns the keys that clients were sent and that match.
func (s *Server) heldKeys(match func(string) bool) []string {
	s.mu.Lock()
	clients := make([]*client, 0, len(s.clients))
	for c := range s.clients {
		clients = append(clients, c)
	}
	s.mu.Unlock()
	seen := make(map[string]bool)
	var keys []string
	for _, c := range clients {
		c.mu.Lock()
		for key := range c.held {
			if !seen[key] && match(key) {
				seen[key] = true
				keys = append(keys, key)
			}
		}
		c.mu.Unlock()
	}
	return keys
}

// enqueue hands a job to the shard of its key, waiting if the shard is
// full: the feed then buffers, and past its bound it sends Resync.
func (s *Server) enqueue(j job) bool {
	q := s.queues[maphash.String(s.seed, j.key)%shards]
	select {
	case q <- j:
		return true
	case <-s.ctx.Done():
		return false
	}
}

func (s *Server) work(q chan job) {
	defer s.workers.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case j := <-q:
			s.push(j.key, j.st)
			if j.done != nil {
				close(j.done)
			}
		}
	}
}

// push sends a record's state to its subscribers: known's, or else what a
// read of the record finds.
func (s *Server) push(key string, known *state) {
	targets := s.subscribers(key)
	if len(targets) == 0 {
		return
	}
	var st state
	if known != nil {
		st = *known
	} else {
		ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
		rec, err := s.storage.Get(ctx, key)
		cancel()
		switch {
		case err == nil:
			st = state{version: rec.Version, value: rec.Value}
		case errors.Is(err, pgstore.ErrNotFound):
			st = state{deleted: true}
		default:
			if s.ctx.Err() == nil {
				s.log.Warn("cannot read a changed record; its subscribers get it with its next change", "key", key, "err", err)
			}
			return
		}
	}
	var msg []byte
	if st.deleted {
		msg, _ = json.Marshal(deletedPush{Type: "deleted", Key: key})
	} else {
		msg, _ = json.Marshal(recordPush{Type: "record", Key: key, Version: st.version, Value: st.value})
	}
	// Subscriptions may have changed during the read.
	for _, c := range s.subscribers(key) {
		c.pushState(key, st, msg)
	}
}

func (s *Server) subscribers(key string) []*client {
	s.mu.Lock()
	defer s.mu.Unlock()
	byKey, byTable := s.keys[key], s.tables[tableOf(key)]
	targets := make([]*client, 0, len(byKey)+len(byTable))
	for c := range byKey {
		targets = append(targets, c)
	}
	for c := range byTable {
		if _, dup := byKey[c]; !dup {
			targets = append(targets, c)
		}
	}
	return targets
}

// refresh pushes the current state of key to its subscribers (c among them)
// and returns once it is queued for sending.
func (s *Server) refresh(ctx context.Context, key string) error {
	j := job{key: key, done: make(chan struct{})}
	if !s.enqueue(j) {
		return errorf(codeUnavailable, "server closing")
	}
	select {
	case <-j.done:
		return nil
	case <-ctx.Done():
		return errorf(codeUnavailable, "server closing")
	}
}

// setLock returns the lock that serialises writes of key on this node.
func (s *Server) setLock(key string) *sync.Mutex {
	return &s.setLocks[maphash.String(s.seed, key)%uint64(len(s.setLocks))]
}

// A state is what a client was last sent of a record.
type state struct {
	version int64
	value   json.RawMessage
	deleted bool
}

func (a state) equal(b state) bool {
	return a.deleted == b.deleted && a.version == b.version && bytes.Equal(a.value, b.value)
}
