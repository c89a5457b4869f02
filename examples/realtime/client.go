package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/pgstore/pgstore"
)

// Per connection: messages waiting to be sent (a client that lets them pile
// up is disconnected rather than slowing the node), and keep-alive.
const (
	sendQueue    = 1024
	writeTimeout = 10 * time.Second
	pingInterval = 30 * time.Second
)

var (
	errTooSlow      = errors.New("client too slow: its send queue is full")
	errDisconnected = errors.New("connection ended")
)

// A client is one WebSocket connection. Its requests are handled in order on
// the connection's goroutine; replies and pushes go out through one queue.
type client struct {
	s      *Server
	conn   *websocket.Conn
	ctx    context.Context // ends with the connection
	cancel context.CancelCauseFunc
	out    chan []byte
	rate   rate // of the messages received; used by the reading goroutine only

	// Subscriptions; guarded by s.mu.
	keys   map[string]bool
	tables map[string]bool

	mu   sync.Mutex
	held map[string]state // what the client was sent, per key
}

func newClient(s *Server, conn *websocket.Conn) *client {
	ctx, cancel := context.WithCancelCause(s.ctx)
	return &client{
		s:      s,
		conn:   conn,
		ctx:    ctx,
		cancel: cancel,
		out:    make(chan []byte, sendQueue),
		rate:   newRate(s.limits.MessagesPerSecond, time.Now()),
		keys:   make(map[string]bool),
		tables: make(map[string]bool),
		held:   make(map[string]state),
	}
}

// serve handles the connection until it ends.
func (c *client) serve() {
	written := make(chan struct{})
	go func() {
		defer close(written)
		c.writeLoop()
	}()
	for {
		// The read ends when the writer closes the connection.
		typ, data, err := c.conn.Read(context.Background())
		if err != nil {
			c.cancel(fmt.Errorf("%w: %w", errDisconnected, err))
			break
		}
		c.handle(typ, data)
	}
	<-written
}

// writeLoop sends the queued messages until the connection ends, and then
// closes it, with a reason when it is the server's doing.
func (c *client) writeLoop() {
	ping := time.NewTicker(pingInterval)
	defer ping.Stop()
	for {
		select {
		case msg := <-c.out:
			// Bounded by the server's life, not the connection's: a
			// client cut off for being too slow still gets the message
			// being written whole, and then its close status. A write cut
			// short would end the connection mid-frame.
			ctx, cancel := context.WithTimeout(c.s.ctx, writeTimeout)
			err := c.conn.Write(ctx, websocket.MessageText, msg)
			cancel()
			if err != nil {
				c.cancel(fmt.Errorf("%w: write: %w", errDisconnected, err))
				c.close()
				return
			}
			c.s.stats.sent.Add(1)
		case <-ping.C:
			ctx, cancel := context.WithTimeout(c.ctx, writeTimeout)
			err := c.conn.Ping(ctx)
			cancel()
			if err != nil {
				c.cancel(fmt.Errorf("%w: ping: %w", errDisconnected, err))
				c.close()
				return
			}
		case <-c.ctx.Done():
			c.close()
			return
		}
	}
}

// close closes the connection as the cause of its end asks. A write cut
// short because the connection was ending for another cause (the server
// closing) closes it for that cause, with its status.
func (c *client) close() {
	switch cause := context.Cause(c.ctx); {
	case errors.Is(cause, errTooSlow):
		c.conn.Close(websocket.StatusPolicyViolation, "too slow: send queue full")
	case errors.Is(cause, errDisconnected):
		c.conn.CloseNow()
	default: // the server is closing
		c.conn.Close(websocket.StatusGoingAway, "server closing")
	}
}

// send queues a message without ever blocking the node: a client whose queue
// is full is disconnected.
func (c *client) send(msg []byte) {
	select {
	case c.out <- msg:
	default:
		if c.ctx.Err() == nil {
			c.s.log.Warn("disconnecting a client that does not keep up", "queued", len(c.out))
			c.cancel(errTooSlow)
		}
	}
}

func (c *client) reply(v any) {
	msg, err := json.Marshal(v)
	if err != nil {
		panic(err) // the reply types always marshal
	}
	c.send(msg)
}

func (c *client) replyError(req *request, err error) {
	var pe *protocolError
	if !errors.As(err, &pe) {
		pe = errorf(codeUnavailable, "internal error")
	}
	r := errorReply{Type: "error", Code: pe.code, Message: pe.msg, Version: pe.version}
	c.s.stats.errorSent(pe.code)
	if req != nil {
		r.ID, r.Key, r.Table = req.ID, req.Key, req.Table
	}
	c.reply(r)
}

// pushState sends a record's state unless the client has it already.
func (c *client) pushState(key string, st state, msg []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.held[key]; ok && (old.equal(st) || !old.deleted && !st.deleted && st.version < old.version) {
		// The same, or older than what the client holds: a read that
		// ran ahead of the change log's events for the key.
		return
	}
	c.held[key] = st
	c.send(msg)
}

// forget drops what the client was sent of the keys that match.
func (c *client) forget(match func(key string) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for key := range c.held {
		if match(key) {
			delete(c.held, key)
		}
	}
}

// handle answers one message.
func (c *client) handle(typ websocket.MessageType, data []byte) {
	// Every message counts, whatever it holds: answering bad ones costs
	// the node too.
	allowed := c.rate.allow(time.Now())
	c.s.stats.received.Add(1)
	if typ != websocket.MessageText {
		c.replyError(nil, errorf(codeBadMessage, "send JSON in text messages"))
		return
	}
	var req request
	if err := json.Unmarshal(data, &req); err != nil {
		var typeErr *json.UnmarshalTypeError
		if !errors.As(err, &typeErr) || checkID(req.ID) != nil {
			c.replyError(nil, errorf(codeBadMessage, "not a JSON object of the protocol: %v", err))
			return
		}
		c.replyError(&req, errorf(codeBadMessage, "field %q has the wrong type: %v", typeErr.Field, err))
		return
	}
	if err := checkID(req.ID); err != nil {
		req.ID = nil
		c.replyError(&req, err)
		return
	}
	if !allowed {
		c.replyError(&req, errorf(codeRateLimited, "over the limit of %d messages a second: not handled; send it again later", c.s.limits.MessagesPerSecond))
		return
	}
	var err error
	switch req.Type {
	case "subscribe":
		err = c.subscribe(&req)
	case "unsubscribe":
		err = c.unsubscribe(&req)
	case "set":
		err = c.set(&req)
	case "delete":
		err = c.delete(&req)
	case "list":
		err = c.list(&req)
	case "":
		err = errorf(codeBadMessage, "type is missing")
	default:
		err = errorf(codeUnknownType, "unknown type %q; use subscribe, unsubscribe, set, delete or list", req.Type)
	}
	if err != nil {
		c.replyError(&req, err)
	}
}

// target returns what a subscribe or unsubscribe names: a key or a table.
func target(req *request) (name string, table bool, err error) {
	switch {
	case req.Key != "" && req.Table != "":
		return "", false, errorf(codeBadMessage, "give a key or a table, not both")
	case req.Table != "":
		return req.Table, true, checkTable(req.Table)
	default:
		return req.Key, false, checkKey(req.Key)
	}
}

func (c *client) subscribe(req *request) error {
	name, table, err := target(req)
	if err != nil {
		return err
	}
	if err := c.s.subscribe(c.ctx, c, name, table); err != nil {
		c.s.unsubscribe(c, name, table)
		return err
	}
	if !table {
		// The current state goes out before the reply.
		if err := c.s.refresh(c.ctx, name); err != nil {
			return err
		}
	}
	c.reply(okReply{Type: "ok", ID: req.ID, Key: req.Key, Table: req.Table})
	return nil
}

func (c *client) unsubscribe(req *request) error {
	name, table, err := target(req)
	if err != nil {
		return err
	}
	c.s.unsubscribe(c, name, table)
	c.reply(okReply{Type: "ok", ID: req.ID, Key: req.Key, Table: req.Table})
	return nil
}

// set writes a record if its version is above the stored one. The node's
// own check refuses equal versions; the storage's version guard refuses a
// lower one written meanwhile by another node.
func (c *client) set(req *request) error {
	if err := checkKey(req.Key); err != nil {
		return err
	}
	switch {
	case req.Version == nil:
		return errorf(codeBadMessage, "set needs a version")
	case *req.Version < 1:
		return errorf(codeBadMessage, "version must be at least 1")
	case len(req.Value) == 0 || string(req.Value) == "null":
		return errorf(codeBadValue, "set needs a value other than null (to remove a record, delete it)")
	case len(req.Value) > c.s.limits.MaxValueBytes:
		return errorf(codeTooLarge, "value is %d bytes, over the limit of %d", len(req.Value), c.s.limits.MaxValueBytes)
	}
	version := *req.Version
	lock := c.s.setLock(req.Key)
	lock.Lock()
	defer lock.Unlock()
	ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
	defer cancel()
	cur, err := c.s.storage.Get(ctx, req.Key)
	switch {
	case err == nil && version <= cur.Version:
		pe := errorf(codeStaleVersion, "version %d is not above the stored version %d", version, cur.Version)
		pe.version = &cur.Version
		return pe
	case err != nil && !errors.Is(err, pgstore.ErrNotFound):
		c.s.log.Warn("set: cannot read the stored version", "key", req.Key, "err", err)
		return storageError("set", req.Key, err)
	}
	if err := c.s.storage.Set(ctx, req.Key, version, json.RawMessage(req.Value)); err != nil {
		pe := storageError("set", req.Key, err)
		if pe.code == codeUnavailable {
			c.s.log.Warn("set failed", "key", req.Key, "err", err)
		}
		return pe
	}
	c.reply(okReply{Type: "ok", ID: req.ID, Key: req.Key, Version: version})
	return nil
}

func (c *client) delete(req *request) error {
	if err := checkKey(req.Key); err != nil {
		return err
	}
	lock := c.s.setLock(req.Key)
	lock.Lock()
	defer lock.Unlock()
	ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
	defer cancel()
	if err := c.s.storage.Delete(ctx, req.Key); err != nil {
		c.s.log.Warn("delete failed", "key", req.Key, "err", err)
		return storageError("delete", req.Key, err)
	}
	c.reply(okReply{Type: "ok", ID: req.ID, Key: req.Key})
	return nil
}

// list answers with the records of a table. If the client subscribes to the
// table, the records listed count as held by it, so that a Resync refreshes
// them too; what it was pushed already stays as it is.
func (c *client) list(req *request) error {
	if err := checkTable(req.Table); err != nil {
		return err
	}
	lister, ok := c.s.storage.(Lister)
	if !ok {
		return errorf(codeUnavailable, "this storage cannot list tables")
	}
	ctx, cancel := context.WithTimeout(c.ctx, opTimeout)
	defer cancel()
	entries, err := lister.List(ctx, req.Table, maxListRecords+1)
	if err != nil {
		c.s.log.Warn("list failed", "table", req.Table, "err", err)
		return errorf(codeUnavailable, "list %q failed; try again", req.Table)
	}
	r := recordsReply{Type: "records", ID: req.ID, Table: req.Table, Records: make([]Entry, 0, len(entries))}
	size := 0
	for i, e := range entries {
		size += len(e.Value)
		if i == maxListRecords || size > maxListBytes {
			r.Truncated = true
			break
		}
		r.Records = append(r.Records, e)
	}
	c.s.mu.Lock()
	subscribed := c.tables[req.Table]
	c.s.mu.Unlock()
	if subscribed {
		c.mu.Lock()
		for _, e := range r.Records {
			if _, ok := c.held[e.Key]; !ok {
				c.held[e.Key] = state{version: e.Version, value: e.Value}
			}
		}
		c.mu.Unlock()
	}
	c.reply(r)
	return nil
}

// A rate is a token bucket: perSecond messages a second, in bursts of up to
// a second's worth. A message refused costs nothing, so that a client that
// keeps sending still gets perSecond through.
type rate struct {
	perSecond float64 // 0: no limit
	tokens    float64
	last      time.Time
}

func newRate(perSecond int, now time.Time) rate {
	return rate{perSecond: float64(perSecond), tokens: float64(perSecond), last: now}
}

// allow reports whether a message received at now is within the rate, and
// counts it if so.
func (r *rate) allow(now time.Time) bool {
	if r.perSecond <= 0 {
		return true
	}
	r.tokens = min(r.perSecond, r.tokens+now.Sub(r.last).Seconds()*r.perSecond)
	r.last = now
	if r.tokens < 1 {
		return false
	}
	r.tokens--
	return true
}
