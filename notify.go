package pgstore

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// EventType says what happened to a table or record.
type EventType uint8

// The event types. CreateTable and DestroyTable come from the connector's DDL,
// Insert, Update and Delete from triggers on the record tables, and Resync from
// the subscriber's own side when events may have been missed.
const (
	CreateTable EventType = iota + 1
	DestroyTable
	Insert
	Update
	Delete
	// Resync means events may have been lost (the LISTEN connection was
	// re-established, or the subscription's queue overflowed): re-read every
	// record you hold.
	Resync
)

var eventNames = [...]string{
	CreateTable:  "CREATE_TABLE",
	DestroyTable: "DESTROY_TABLE",
	Insert:       "INSERT",
	Update:       "UPDATE",
	Delete:       "DELETE",
	Resync:       "RESYNC",
}

// String returns the deepstream name of the event type, such as "INSERT".
func (t EventType) String() string {
	if t >= CreateTable && t <= Resync {
		return eventNames[t]
	}
	return fmt.Sprintf("EventType(%d)", uint8(t))
}

// payloadOps are the "op" values of notification payloads.
var payloadOps = map[string]EventType{
	"create_table":  CreateTable,
	"destroy_table": DestroyTable,
	"insert":        Insert,
	"update":        Update,
	"delete":        Delete,
}

func (t EventType) payloadOp() string {
	return strings.ToLower(t.String())
}

// eventSet is a set of event types, one bit each.
type eventSet uint8

const allEvents = eventSet(1<<CreateTable | 1<<DestroyTable | 1<<Insert | 1<<Update | 1<<Delete)

func (s eventSet) has(t EventType) bool { return s&(1<<t) != 0 }

// WithEvents sets which events the database generates for this schema:
// CreateTable, DestroyTable, Insert, Update, Delete. A type left out costs
// nothing at write time, because its trigger is not installed; WithEvents()
// with no types turns the change feed off. When this option is given, the
// triggers of the schema's existing tables are brought in line as the
// connector starts, and the events are recorded in the schema. Connectors
// without the option follow what the schema records (all five if it records
// nothing) for the tables they create, and change no existing table's
// triggers, so a connector that only reads or subscribes changes nothing.
// Two connectors given different events take turns: the last to start wins.
func WithEvents(types ...EventType) Option {
	return func(c *config) error {
		var set eventSet
		for _, t := range types {
			if t < CreateTable || t > Delete {
				return fmt.Errorf("WithEvents: %v cannot be switched; choose among CREATE_TABLE, DESTROY_TABLE, INSERT, UPDATE and DELETE", t)
			}
			set |= 1 << t
		}
		c.events = set
		c.eventsChosen = true
		return nil
	}
}

// notifyFunction is the trigger function pgstore installs in its schema. The
// version suffix lets a later release install a changed function beside it.
const notifyFunction = "pgstore_notify_v1"

// Payload budget. NOTIFY refuses payloads of 8000 bytes or more. Rows are
// grouped into chunks of under chunkBytes of JSON; an id whose JSON text would
// exceed inlineIDBytes (possible only with many escaped characters) is sent in
// base64, which for MaxIDBytes is at most 3592 bytes. A chunk is then at most
// chunkBytes plus one row, plus a header with the table name (at most 63
// bytes, 6 when escaped): under 7900 bytes.
const (
	chunkBytes    = 3700
	inlineIDBytes = 3600
)

// notifyFunctionSQL creates the statement-level trigger function: one
// notification per chunk of changed rows, on the channel named after the
// schema, with the payload
//
//	{"op": "insert", "table": "cars", "rows": [["bmw", 3], [null, 4, "<base64 id>"]]}
func notifyFunctionSQL(schema string) string {
	return fmt.Sprintf(`CREATE FUNCTION %s.%s() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	payload text;
BEGIN
	FOR payload IN
		SELECT json_build_object('op', lower(TG_OP), 'table', TG_TABLE_NAME, 'rows', json_agg(e))::text
		FROM (
			SELECT e, sum(octet_length(e::text) + 2) OVER (ROWS UNBOUNDED PRECEDING) / %d AS chunk
			FROM (
				SELECT CASE WHEN octet_length(to_json(id)::text) <= %d
					THEN json_build_array(id, version)
					ELSE json_build_array(NULL, version, translate(encode(convert_to(id, 'UTF8'), 'base64'), E'\n', ''))
				END AS e
				FROM changed_rows
			) AS r
		) AS c
		GROUP BY chunk
	LOOP
		PERFORM pg_notify(TG_TABLE_SCHEMA, payload);
	END LOOP;
	RETURN NULL;
END
$fn$`, pgx.Identifier{schema}.Sanitize(), notifyFunction, chunkBytes, inlineIDBytes)
}

// rowTriggers are the statement-level triggers of a record table, by event.
// With the change log on, the log_ triggers take the place of the others.
var rowTriggers = []struct {
	event      EventType
	name, when string
}{
	{Insert, "insert", "AFTER INSERT ON %s REFERENCING NEW TABLE AS changed_rows"},
	{Update, "update", "AFTER UPDATE ON %s REFERENCING NEW TABLE AS changed_rows"},
	{Delete, "delete", "AFTER DELETE ON %s REFERENCING OLD TABLE AS changed_rows"},
}

// triggerName is the name of a table's trigger for an event.
func triggerName(base string, logged bool) string {
	if logged {
		return "pgstore_log_" + base
	}
	return "pgstore_" + base
}

// triggerSQL returns the statements that create the triggers for the events
// in the set: notifying until the schema's log is on, appending to it once
// it is being switched on (see logState).
func triggerSQL(schema, table string, events eventSet, state logState) []string {
	var stmts []string
	if state != logNone && events&rowEvents != 0 {
		stmts = append(stmts, headLockTriggerSQL(schema, table))
	}
	for _, tr := range rowTriggers {
		if !events.has(tr.event) {
			continue
		}
		if state != logOn {
			stmts = append(stmts, rowTriggerSQL(schema, table, tr.name, tr.when, false))
		}
		if state != logNone {
			stmts = append(stmts, rowTriggerSQL(schema, table, tr.name, tr.when, true))
		}
	}
	return stmts
}

// rowTriggerSQL creates one of a table's rowTriggers.
func rowTriggerSQL(schema, table, name, when string, logged bool) string {
	function := notifyFunction
	if logged {
		function = logFunction
	}
	return fmt.Sprintf("CREATE TRIGGER %s "+when+" FOR EACH STATEMENT EXECUTE FUNCTION %s.%s()",
		triggerName(name, logged), pgx.Identifier{schema, table}.Sanitize(), pgx.Identifier{schema}.Sanitize(), function)
}

// announceDDL records a table event inside the DDL's transaction: in the
// change log when the schema has one, else as a notification.
func announceDDL(ctx context.Context, tx pgx.Tx, schema string, t EventType, table string) error {
	state, err := readLogState(ctx, tx, schema)
	if err != nil {
		return err
	}
	if state != logNone {
		if err := appendDDL(ctx, tx, schema, t, table); err != nil {
			return err
		}
	}
	if state != logOn {
		return notifyDDL(ctx, tx, schema, t, table)
	}
	return nil
}

// notifyDDL announces a table created or dropped, inside the DDL's transaction
// so that the event is sent exactly when the change commits.
func notifyDDL(ctx context.Context, tx pgx.Tx, schema string, t EventType, table string) error {
	payload, err := json.Marshal(struct {
		Op    string `json:"op"`
		Table string `json:"table"`
	}{t.payloadOp(), table})
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "SELECT pg_notify($1, $2)", schema, string(payload))
	return err
}

// An Event is one change delivered to a subscription.
type Event struct {
	Type   EventType
	Schema string
	// Table is empty for Resync.
	Table string
	// ID and Key ("table/id") are empty for table events and Resync.
	ID  string
	Key string
	// Version is the record's version after an insert or update, and the
	// version it had when it was deleted.
	Version int64

	// With the change log only (see WithChangeLog):

	// Value is the record's JSON as of this change, for inserts and updates.
	Value json.RawMessage
	// Cursor is the position of this change in the log: pass it to After
	// to resume after it. On a Resync, it is where the subscription goes on
	// from.
	Cursor string
	// Offset numbers the changes of one table: 1, 2, 3… in commit order,
	// without gaps.
	Offset int64
	// Reason says why a Resync was delivered: ErrCursorExpired or
	// ErrLogGone. It is nil on other events, and on the Resync of the
	// NOTIFY feed.
	Reason error
}

// A Filter narrows what a subscription receives.
type Filter func(*subscribeConfig) error

type subscribeConfig struct {
	schema string
	types  eventSet // empty: all
	tables map[string]bool
	// From After: the cursor as given, and as Subscribe read it, so that
	// its error is Subscribe's own.
	afterText *string
	after     *cursor
}

// ForEvents delivers only events of the given types, at least one. Resync is
// delivered whatever the filter, since it means events may be missing.
func ForEvents(types ...EventType) Filter {
	return func(sc *subscribeConfig) error {
		if len(types) == 0 {
			return errors.New("ForEvents: no event type named; leave the filter out to receive every type")
		}
		for _, t := range types {
			if t < CreateTable || t > Resync {
				return fmt.Errorf("ForEvents: unknown event type %v", t)
			}
			sc.types |= 1 << t
		}
		return nil
	}
}

// ForTables delivers only events of the named tables (and Resync). It needs
// at least one name; a name with a "/", which no key's table can hold, is
// refused.
func ForTables(names ...string) Filter {
	return func(sc *subscribeConfig) error {
		if len(names) == 0 {
			return errors.New("ForTables: no table named; leave the filter out to receive every table's events")
		}
		if sc.tables == nil {
			sc.tables = make(map[string]bool)
		}
		for _, name := range names {
			if err := checkIdentifier("table", name); err != nil {
				return fmt.Errorf("ForTables: %w", err)
			}
			if strings.Contains(name, "/") {
				return fmt.Errorf("ForTables: table name %q holds a /, which no table of a key can: the table is the text before a key's first /", name)
			}
			sc.tables[name] = true
		}
		return nil
	}
}

// ForSchema subscribes to the events of another schema than the connector's,
// such as one written by connectors of another application.
func ForSchema(name string) Filter {
	return func(sc *subscribeConfig) error {
		if err := checkIdentifier("schema", name); err != nil {
			return fmt.Errorf("ForSchema: %w", err)
		}
		sc.schema = name
		return nil
	}
}

// A subscription's queue holds at most subscriptionQueue notifications (each
// up to 8000 bytes of changes of one table) and subscriptionEvents events.
const (
	subscriptionQueue  = 1024
	subscriptionEvents = 65536
)

// A notice is the events of one notification, shared by every subscription
// that receives it.
type notice struct {
	typ    EventType
	table  string
	events []Event
}

// A Subscription delivers events to its handler, one at a time and in the
// order the database committed them, on a goroutine of its own.
type Subscription struct {
	c       *Connector
	cfg     subscribeConfig
	handler func(Event)
	queue   chan *notice
	wake    chan struct{}
	stopped chan struct{}
	done    chan struct{}
	gid     atomic.Uint64 // the delivering goroutine

	// Following a change log: the log's channel, and the context of reads,
	// ended by stop.
	channel    string
	readCtx    context.Context
	cancelRead context.CancelFunc
	logPos     atomic.Int64 // delivered up to
	toLog      atomic.Bool  // of the NOTIFY feed: switch to the log (see logStarted)
	stopping   bool         // under the connector's subsMu: stop has begun
	logEnd     atomic.Int64 // the log's end, as of the last read
	logAt      atomic.Int64 // when the entry being delivered was appended, by the client's clock, in Unix ns

	mu     sync.Mutex
	lost   bool // the queue overflowed: drop notices until Resync is delivered
	queued int  // events in the queue

	callMu  sync.Mutex
	calling bool // the handler runs; under callMu, which call checks stopped under

	closeOnce sync.Once
}

// Subscribe calls handler for every change in the connector's schema (or the
// one named by ForSchema) that passes the filters. It returns once the server
// is listening: every change committed after Subscribe returns is delivered,
// unless a Resync event says that some may have been missed.
//
// Each subscription has its own goroutine and a bounded queue, so a slow
// handler delays only itself; if its queue overflows it receives a Resync in
// place of what was dropped. A handler that panics is recovered, the panic
// logged, and the subscription goes on. ctx bounds only the setup: cancelling
// it later changes nothing; Close ends the subscription.
//
// On a schema with a change log (see WithChangeLog), the subscription reads
// the log instead, from its end or from After(cursor): it lags behind a slow
// handler and never overflows, and its events carry Value, Cursor and
// Offset. Resync then means only what its Reason says.
func (c *Connector) Subscribe(ctx context.Context, handler func(Event), filters ...Filter) (*Subscription, error) {
	if handler == nil {
		return nil, errors.New("pgstore: Subscribe: handler is nil")
	}
	if c.closing.Load() {
		return nil, ErrClosed
	}
	s := &Subscription{
		c:       c,
		cfg:     subscribeConfig{schema: c.cfg.schema},
		handler: handler,
		queue:   make(chan *notice, subscriptionQueue),
		wake:    make(chan struct{}, 1),
		stopped: make(chan struct{}),
		done:    make(chan struct{}),
	}
	for i, f := range filters {
		if f == nil {
			return nil, fmt.Errorf("pgstore: Subscribe: filter %d of %d is nil", i+1, len(filters))
		}
		if err := f(&s.cfg); err != nil {
			return nil, fmt.Errorf("pgstore: Subscribe: %w", err)
		}
	}
	if s.cfg.afterText != nil {
		cu, err := parseCursor(*s.cfg.afterText)
		if err != nil {
			return nil, err
		}
		s.cfg.after = &cu
	}
	state, err := readLogState(ctx, c.pool, s.cfg.schema)
	if err != nil {
		return nil, fmt.Errorf("pgstore: Subscribe: %w", err)
	}
	if state == logOn {
		return c.subscribeLog(ctx, s)
	}
	if s.cfg.after != nil {
		return nil, fmt.Errorf("pgstore: Subscribe: After needs a change log, and schema %q has none (see WithChangeLog)", s.cfg.schema)
	}
	c.startListener()
	c.subsMu.Lock()
	if c.subs == nil { // closed meanwhile
		c.subsMu.Unlock()
		return nil, ErrClosed
	}
	if c.subs[s.cfg.schema] == nil {
		c.subs[s.cfg.schema] = make(map[*Subscription]struct{})
	}
	c.subs[s.cfg.schema][s] = struct{}{}
	c.subsMu.Unlock()
	go s.deliver()
	if err := c.listener.Listen(ctx, s.cfg.schema); err != nil {
		s.close(false)
		return nil, fmt.Errorf("pgstore: Subscribe: listen on %q: %w", s.cfg.schema, err)
	}
	// The log may have been switched on between the look above and the
	// LISTEN, its announcement then unheard.
	if state, err := readLogState(ctx, c.pool, s.cfg.schema); err == nil && state == logOn {
		c.logStarted(s.cfg.schema)
	}
	return s, nil
}

// Close stops the subscription: no handler call starts once it returns. It
// waits for a call in progress to return, until ctx ends; it then returns
// ctx's error, and that call is the last. Called from the handler itself, it
// returns at once.
func (s *Subscription) Close(ctx context.Context) error {
	s.stop(true)
	if err := s.wait(ctx); err != nil {
		return fmt.Errorf("pgstore: Subscription.Close: the handler has not returned: %w", err)
	}
	return nil
}

func (s *Subscription) close(unlisten bool) {
	s.stop(unlisten)
	_ = s.wait(context.Background())
}

// stop ends deliveries: no handler call starts after it.
func (s *Subscription) stop(unlisten bool) {
	s.closeOnce.Do(func() {
		channel := s.cfg.schema
		s.c.subsMu.Lock()
		s.stopping = true
		if s.channel != "" {
			channel = s.channel
			delete(s.c.logSubs[channel], s)
		} else {
			delete(s.c.subs[s.cfg.schema], s)
		}
		cancel := s.cancelRead
		s.c.subsMu.Unlock()
		if unlisten {
			s.c.listener.Unlisten(channel)
		}
		if cancel != nil {
			cancel()
		}
		close(s.stopped)
	})
}

// wait waits, after stop, for the subscription's goroutine to end, unless
// it is the caller itself. Only a handler call in progress can make that
// take long, so only then does ctx bound the wait.
func (s *Subscription) wait(ctx context.Context) error {
	if s.gid.Load() == goid() {
		return nil
	}
	s.callMu.Lock()
	calling := s.calling // no call starts after stop
	s.callMu.Unlock()
	if !calling {
		<-s.done // its reads and sleeps end with stop
		return nil
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Subscription) accepts(n *notice) bool {
	if n.typ == Resync {
		return true
	}
	return (s.cfg.types == 0 || s.cfg.types.has(n.typ)) && (s.cfg.tables == nil || s.cfg.tables[n.table])
}

// push queues a notice without ever blocking the listener.
func (s *Subscription) push(n *notice) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lost {
		return // the coming Resync covers it
	}
	if s.queued+len(n.events) <= subscriptionEvents {
		select {
		case s.queue <- n:
			s.queued += len(n.events)
			return
		default:
		}
	}
	s.lost = true
	s.c.overflows.Add(1)
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Subscription) deliver() {
	defer close(s.done)
	s.gid.Store(goid())
	for {
		select {
		case <-s.stopped:
			return
		case n := <-s.queue:
			for _, e := range n.events {
				if !s.call(e) {
					return
				}
			}
			s.mu.Lock()
			s.queued -= len(n.events)
			s.mu.Unlock()
		case <-s.wake:
		}
		if s.toLog.Load() {
			s.switchToLog()
			return
		}
		s.mu.Lock()
		resync := s.lost && len(s.queue) == 0
		if resync {
			s.lost = false
		}
		s.mu.Unlock()
		if resync && !s.call(Event{Type: Resync, Schema: s.cfg.schema}) {
			return
		}
	}
}

// call runs the handler unless the subscription is closed, and survives a
// panic in it.
func (s *Subscription) call(e Event) (open bool) {
	s.callMu.Lock()
	select {
	case <-s.stopped:
		s.callMu.Unlock()
		return false
	default:
	}
	s.calling = true
	s.callMu.Unlock()
	defer func() {
		s.callMu.Lock()
		s.calling = false
		s.callMu.Unlock()
	}()
	open = true // also after a panic
	if e.Type == Resync {
		s.c.resyncs.Add(1)
	} else {
		s.c.delivered.Add(1)
	}
	defer func() {
		if r := recover(); r != nil {
			s.c.cfg.logger.Error("pgstore: subscription handler panicked", "event", e.Type.String(), "key", e.Key, "panic", r)
		}
	}()
	s.handler(e)
	return open
}

// goid returns the current goroutine's id, so that Subscription.Close can
// tell whether it runs inside the handler, where waiting for the handler to
// return would wait forever.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	id, _ := strconv.ParseUint(string(b[:bytes.IndexByte(b, ' ')]), 10, 64)
	return id
}

// listeningConn returns a connection of the pool's settings for LISTEN, which
// the pool no longer counts: one hijacked from the pool, unless the pool's
// connections hand notifications to an OnNotification of the caller's, in
// which case pgx would not buffer them for WaitForNotification. It then opens
// one like the pool's, with the pool's BeforeConnect and AfterConnect hooks.
func (c *Connector) listeningConn(ctx context.Context) (*pgx.Conn, error) {
	cfg := c.pool.Config()
	if cfg.ConnConfig.OnNotification == nil {
		pooled, err := c.pool.Acquire(ctx)
		if err != nil {
			return nil, err
		}
		return pooled.Hijack(), nil
	}
	cc := cfg.ConnConfig // a copy
	cc.OnNotification = nil
	if cfg.BeforeConnect != nil {
		if err := cfg.BeforeConnect(ctx, cc); err != nil {
			return nil, err
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return nil, err
	}
	if cfg.AfterConnect != nil {
		if err := cfg.AfterConnect(ctx, conn); err != nil {
			conn.Close(ctx)
			return nil, err
		}
	}
	return conn, nil
}

// startListener starts the connector's LISTEN connection on first use.
func (c *Connector) startListener() {
	c.listenerOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		c.stopListener = cancel
		go func() {
			defer close(c.listenerDone)
			c.listener.Run(ctx)
		}()
	})
}

// dispatch hands a notification to the subscriptions of its schema.
func (c *Connector) dispatch(n *pgconn.Notification) {
	if strings.HasPrefix(n.Channel, "pgstore_log_") {
		c.wakeLog(n.Channel)
		return
	}
	if n.Payload == logOnPayload {
		c.logStarted(n.Channel)
		return
	}
	nt, err := parseNotice(n.Payload)
	if err != nil {
		c.cfg.logger.Warn("pgstore: ignoring a notification that is not pgstore's", "channel", n.Channel, "err", err)
		return
	}
	for i := range nt.events {
		nt.events[i].Schema = n.Channel
	}
	c.broadcast(n.Channel, nt)
}

// resyncAll tells every subscription of the NOTIFY feed that events may have
// been missed; those that follow a log just look at it at once.
func (c *Connector) resyncAll() {
	c.subsMu.RLock()
	schemas := make([]string, 0, len(c.subs))
	for schema := range c.subs {
		schemas = append(schemas, schema)
	}
	channels := make([]string, 0, len(c.logSubs))
	for channel := range c.logSubs {
		channels = append(channels, channel)
	}
	c.subsMu.RUnlock()
	for _, channel := range channels {
		c.wakeLog(channel)
	}
	for _, schema := range schemas {
		c.broadcast(schema, &notice{typ: Resync, events: []Event{{Type: Resync, Schema: schema}}})
	}
	// The announcement that a log went on may have been among what was
	// lost: ask.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, schema := range schemas {
		if state, err := readLogState(ctx, c.pool, schema); err == nil && state == logOn {
			c.logStarted(schema)
		}
	}
}

func (c *Connector) broadcast(schema string, nt *notice) {
	c.subsMu.RLock()
	defer c.subsMu.RUnlock()
	for s := range c.subs[schema] {
		if s.accepts(nt) {
			s.push(nt)
		}
	}
}

// parseNotice decodes a payload of notifyFunctionSQL or notifyDDL.
func parseNotice(payload string) (*notice, error) {
	var p struct {
		Op    string              `json:"op"`
		Table string              `json:"table"`
		Rows  [][]json.RawMessage `json:"rows"`
	}
	if err := json.Unmarshal([]byte(payload), &p); err != nil {
		return nil, err
	}
	typ, ok := payloadOps[p.Op]
	if !ok || p.Table == "" || strings.Contains(p.Table, "/") {
		// Not from pgstore's triggers: no table of theirs holds a "/".
		return nil, fmt.Errorf("unknown op %q, or no table or one that no key could name (%q)", p.Op, p.Table)
	}
	nt := &notice{typ: typ, table: p.Table}
	if typ == CreateTable || typ == DestroyTable {
		nt.events = []Event{{Type: typ, Table: p.Table}}
		return nt, nil
	}
	nt.events = make([]Event, 0, len(p.Rows))
	for _, row := range p.Rows {
		if len(row) < 2 {
			return nil, fmt.Errorf("row %s is too short", row)
		}
		var id string
		if string(row[0]) == "null" && len(row) == 3 {
			var b64 string
			if err := json.Unmarshal(row[2], &b64); err != nil {
				return nil, err
			}
			raw, err := base64.StdEncoding.DecodeString(b64)
			if err != nil {
				return nil, err
			}
			id = string(raw)
		} else if err := json.Unmarshal(row[0], &id); err != nil {
			return nil, err
		}
		if id == "" {
			return nil, fmt.Errorf("row %s has no id", row)
		}
		version, err := strconv.ParseInt(string(row[1]), 10, 64)
		if err != nil {
			return nil, err
		}
		nt.events = append(nt.events, Event{Type: typ, Table: p.Table, ID: id, Key: p.Table + "/" + id, Version: version})
	}
	return nt, nil
}
