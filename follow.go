package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstore/pgstore/internal/backoff"
)

// A subscription on a schema with a change log follows the log: it reads
// the entries after its position, a page at a time, and calls its handler
// for each (while it delivers a page it reads the next ones). It lags when
// its handler is slow, and never drops anything or holds more than
// logReadsAhead+1 pages. NOTIFY only wakes it up early: it also looks every
// logPollInterval, so a lost wake-up costs latency, never an event, and a
// lost LISTEN connection costs nothing.

// Reading the log.
const (
	logPageEntries  = 500
	logFirstPage    = 64      // entries, before the values' size is known
	logPageBytes    = 8 << 20 // a page stops at the entry that crosses it
	logReadsAhead   = 2       // pages read while one is delivered
	logPollInterval = time.Second
)

// nextLimit is the entries the next page asks for, after a page of this
// size was asked for with limit.
func nextLimit(page []logEntry, limit int) int {
	if len(page) == 0 {
		return limit
	}
	bytes := 0
	for _, e := range page {
		bytes += len(e.value) + len(e.text) + 64
	}
	return min(max(logPageBytes/max(bytes/len(page), 1), 1), logPageEntries)
}

// After makes a subscription on a schema with a change log start after the
// given cursor (an Event's Cursor, saved by a process before it stopped, or
// the cursor returned by List or GetMany), instead of at the log's end. A
// cursor that is malformed, of another log, or beyond the log's end fails
// Subscribe with ErrInvalidCursor; one older than the retention gets a Resync
// whose Reason is ErrCursorExpired.
func After(c string) Filter {
	return func(sc *subscribeConfig) error {
		sc.afterText = &c
		return nil
	}
}

// subscribeLog starts a subscription that follows the schema's log.
func (c *Connector) subscribeLog(ctx context.Context, s *Subscription) (*Subscription, error) {
	head, err := readHead(ctx, c.pool, s.cfg.schema)
	if err != nil {
		return nil, fmt.Errorf("pgstore: Subscribe: read the change log of %q: %w", s.cfg.schema, err)
	}
	pos := head.position
	if a := s.cfg.after; a != nil {
		switch {
		case a.log != head.log:
			return nil, fmt.Errorf("%w %q: of another log than schema %q's (a schema destroyed and made again, or another schema)", ErrInvalidCursor, a.String(), s.cfg.schema)
		case a.position > head.position:
			return nil, fmt.Errorf("%w %q: beyond the log's end, %d", ErrInvalidCursor, a.String(), head.position)
		}
		pos = a.position
	}
	c.startListener()
	if !c.joinLog(s) {
		return nil, ErrClosed
	}
	go func() {
		defer close(s.done)
		s.gid.Store(goid())
		s.follow(head.log, pos)
	}()
	if err := c.listener.Listen(ctx, s.channel); err != nil {
		s.close(false)
		return nil, fmt.Errorf("pgstore: Subscribe: listen on %q: %w", s.channel, err)
	}
	return s, nil
}

// joinLog registers a subscription among those that follow its schema's
// log, with the context of its reads, which stop cancels; it reports false
// if the connector or the subscription was closed meanwhile.
func (c *Connector) joinLog(s *Subscription) bool {
	channel := logChannel(s.cfg.schema)
	c.subsMu.Lock()
	defer c.subsMu.Unlock()
	if c.subs == nil || s.stopping {
		return false
	}
	delete(c.subs[s.cfg.schema], s) // when it leaves the NOTIFY feed
	if c.logSubs[channel] == nil {
		c.logSubs[channel] = make(map[*Subscription]struct{})
	}
	c.logSubs[channel][s] = struct{}{}
	s.channel = channel
	s.readCtx, s.cancelRead = context.WithCancel(context.Background())
	return true
}

// follow reads the log after pos and delivers it, until the subscription
// stops.
func (s *Subscription) follow(logID string, pos int64) {
	wait := backoff.Backoff{Min: 50 * time.Millisecond, Max: 5 * time.Second}
	poll := time.NewTimer(logPollInterval)
	defer poll.Stop()
	// While a page is delivered, the next ones are read, logReadsAhead at
	// most: positions are gapless, so where each starts is known before
	// the one before it arrives. A reader far behind so keeps the server
	// and the client busy at once, and holds logReadsAhead+1 pages.
	var ahead []pendingRead
	gone := false // the log was found removed, and the Resync delivered
	// How many entries a page asks for: as many as fit logPageBytes at the
	// size of the last page's values, so that a log of large values is not
	// sent 500 at a time only to be cut at the client.
	limit := logFirstPage
	// The partition the next read looks in first: the one that took the
	// appends when the last read found the log's end (-1: the whole log).
	part := -1
	drain := func() {
		for _, p := range ahead {
			<-p.done // ended by stop, which cancels the reads
		}
		ahead = nil
	}
	defer drain()
	for {
		s.logPos.Store(pos)
		var r pageRead
		if len(ahead) > 0 && ahead[0].from == pos {
			r = <-ahead[0].done
			ahead = ahead[1:]
		} else {
			drain() // they started where a page cut short did not end
			r = s.read(pos, limit, part)
		}
		part = -1
		page, head, err := r.page, r.head, r.err
		switch {
		case s.readCtx.Err() != nil:
			return
		case isUndefinedTable(err):
			// The schema was destroyed: say so once, then look for a log
			// made again, which the check of its identity below takes up.
			if !gone && !s.call(Event{Type: Resync, Schema: s.cfg.schema, Reason: ErrLogGone}) {
				return
			}
			gone = true
			if !s.sleep(logPollInterval) {
				return
			}
			continue
		case err != nil:
			s.c.cfg.logger.Warn("pgstore: cannot read the change log; retrying", "schema", s.cfg.schema, "err", err)
			if !s.sleep(wait.Next()) {
				return
			}
			continue
		case head.log != logID:
			if !gone && !s.call(Event{Type: Resync, Schema: s.cfg.schema, Reason: ErrLogGone, Cursor: cursor{log: head.log}.String()}) {
				return
			}
			gone = false
			logID, pos = head.log, 0
			continue
		case pos < head.dropped:
			// The entries after pos are gone: go on from the end.
			at := cursor{log: logID, position: head.position}
			if !s.call(Event{Type: Resync, Schema: s.cfg.schema, Reason: ErrCursorExpired, Cursor: at.String()}) {
				return
			}
			pos = head.position
			continue
		}
		wait.Reset()
		s.logEnd.Store(head.position)
		limit = nextLimit(page, limit)
		if n := len(page); n > 0 {
			next := page[n-1].position
			if k := len(ahead); k > 0 {
				next = ahead[k-1].from + int64(ahead[k-1].limit)
			}
			for ; len(ahead) < logReadsAhead && next < head.position; next += int64(limit) {
				p := pendingRead{from: next, limit: limit, done: make(chan pageRead, 1)}
				go func() { p.done <- s.read(p.from, p.limit, -1) }()
				ahead = append(ahead, p)
			}
		}
		for i := range page {
			e := &page[i]
			s.logAt.Store(head.clientTime(e.at).UnixNano())
			if ev := e.event(s.cfg.schema); s.wants(ev) && !s.call(ev) {
				return
			}
			pos = e.position
			s.logPos.Store(pos)
		}
		if len(page) > 0 && pos < head.position {
			continue // more to read at once
		}
		part = int(head.part)
		poll.Reset(logPollInterval)
		select {
		case <-s.stopped:
			return
		case <-s.wake:
		case <-poll.C:
		}
	}
}

// A pendingRead is a read of the page after from, under way.
type pendingRead struct {
	from  int64
	limit int
	done  chan pageRead
}

// A pageRead is the result of readLog.
type pageRead struct {
	page []logEntry
	head logHeadRow
	err  error
}

func (s *Subscription) read(pos int64, limit, part int) pageRead {
	page, head, err := s.c.readLog(s.readCtx, s.cfg.schema, pos, limit, part)
	return pageRead{page, head, err}
}

func (s *Subscription) sleep(d time.Duration) bool {
	select {
	case <-s.stopped:
		return false
	case <-s.wake:
		return true
	default:
	}
	return backoff.Sleep(s.readCtx, d)
}

// wants applies the filters to an event of the log.
func (s *Subscription) wants(e Event) bool {
	return (s.cfg.types == 0 || s.cfg.types.has(e.Type)) && (s.cfg.tables == nil || s.cfg.tables[e.Table])
}

// readLog reads a page of the entries after pos, with the head, in one
// round trip.
//
// With part >= 0 it first reads that partition alone: a reader at the log's
// end, woken for what was just appended, finds it in the partition that took
// the appends at its last read, and a partition read skips the planning and
// locking of all four (a fifth of the read's time, measured). A partition
// holds one run of positions, so a page of it that starts right after pos is
// the log's; one that does not (the log rotated since, or the partition was
// emptied and reused) is read again from the whole log.
func (c *Connector) readLog(ctx context.Context, schema string, pos int64, limit, part int) ([]logEntry, logHeadRow, error) {
	page, head, err := c.readPage(ctx, schema, pos, limit, part)
	misses := len(page) == 0 && head.position > pos || len(page) > 0 && page[0].position != pos+1
	// The head's end was read from the partition too: of use only if the
	// partition still takes the appends.
	if err == nil && part >= 0 && (int(head.part) != part || pos >= head.dropped && misses) {
		page, head, err = c.readPage(ctx, schema, pos, limit, -1)
	}
	if err != nil {
		return nil, head, err
	}
	if pos < head.dropped {
		return nil, head, nil // expired: what was read may not follow pos
	}
	// Entries this reader has not yet seen cannot be missing in between:
	// appends are serialised and visible in position order.
	if len(page) > 0 && page[0].position != pos+1 {
		return nil, head, fmt.Errorf("pgstore: internal error: the change log skips from %d to %d", pos, page[0].position)
	}
	return page, head, nil
}

// readPage reads the head and a page after pos (see readPageSQL) in one
// batch: two statements, so that neither is planned as a join. The head's
// statement also makes the page's take its generic plan, which the plan
// cache stops choosing once the log is large: it then plans every read
// afresh, a tenth of a millisecond here, for the plan it would have had.
func (c *Connector) readPage(ctx context.Context, schema string, pos int64, limit, part int) ([]logEntry, logHeadRow, error) {
	var head logHeadRow
	var page []logEntry
	var pb pgx.Batch
	pb.Queue(readHeadGenericSQL(schema, part)).QueryRow(func(row pgx.Row) error {
		err := row.Scan(head.scan()...)
		// Here, before the page is read: its transfer is no part of the
		// difference between the clocks.
		head.skew = time.Since(head.now)
		return err
	})
	pb.Queue(readPageSQL(schema, part), pos, limit).Query(func(rows pgx.Rows) error {
		// As many as the head, read just before, says there are: a reader
		// woken for one entry does not make room for a whole page. (More
		// may have committed since; append makes room for them.)
		page = make([]logEntry, 0, min(int64(limit), max(head.position-pos, 1)))
		sc := logScanner{logID: head.log}
		bytes := 0
		for rows.Next() {
			page = append(page, logEntry{})
			e := &page[len(page)-1]
			if err := sc.scan(rows, e); err != nil {
				return err
			}
			if bytes += len(e.value); bytes >= logPageBytes {
				break // the rest of the page is read and dropped by pgx
			}
		}
		return rows.Err()
	})
	err := c.pool.SendBatch(ctx, &pb).Close()
	return page, head, err
}

// logOnPayload is the notification, on a schema's NOTIFY-feed channel, that
// the schema's change log is on and every table appends to it: the feed's
// subscriptions then switch to following the log.
const logOnPayload = `{"op":"log_on"}`

// ErrLogStarted is the Reason of the Resync that a subscription of the NOTIFY
// feed receives when another connector switches the schema's change log on:
// events may have been missed in the switch; the subscription follows the
// log from then on.
var ErrLogStarted = errors.New("pgstore: the schema's change log was switched on")

// announceLog tells the NOTIFY-feed subscriptions of the schema, wherever
// they are, that every table now appends to the log.
func announceLog(ctx context.Context, db interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}, schema string) error {
	_, err := db.Exec(ctx, "SELECT pg_notify($1, $2)", schema, logOnPayload)
	return err
}

// logStarted marks the NOTIFY-feed subscriptions of a schema for the switch
// to its log (see switchToLog).
func (c *Connector) logStarted(schema string) {
	if schema == c.cfg.schema {
		c.logged.Store(true)
	}
	c.subsMu.RLock()
	defer c.subsMu.RUnlock()
	for s := range c.subs[schema] {
		s.toLog.Store(true)
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// switchToLog makes a subscription of the NOTIFY feed follow the schema's
// log, on its own goroutine: it reads the log's end, delivers a Resync (the
// handler re-reads what it holds), then follows the log from that end, so
// nothing is missed, until the subscription stops.
func (s *Subscription) switchToLog() {
	c, schema := s.c, s.cfg.schema
	// From here on, stop finds the subscription among the log's and
	// cancels its reads.
	if !c.joinLog(s) {
		return
	}
	head, err := readHead(s.readCtx, c.pool, schema)
	for err != nil {
		c.cfg.logger.Warn("pgstore: cannot read the change log to switch a subscription to it; retrying", "schema", schema, "err", err)
		if !s.sleep(time.Second) {
			return
		}
		head, err = readHead(s.readCtx, c.pool, schema)
	}
	if err := c.listener.Listen(s.readCtx, s.channel); err != nil {
		return // stopped
	}
	c.listener.Unlisten(schema)
	if s.call(Event{Type: Resync, Schema: schema, Reason: ErrLogStarted, Cursor: cursor{log: head.log, position: head.position}.String()}) {
		s.follow(head.log, head.position)
	}
}

// logLags returns how many entries each subscription following the log of
// the connector's schema has yet to deliver, as of its last read.
func (c *Connector) logLags() []int64 {
	c.subsMu.RLock()
	defer c.subsMu.RUnlock()
	var lags []int64
	for s := range c.logSubs[logChannel(c.cfg.schema)] {
		lags = append(lags, max(s.logEnd.Load()-s.logPos.Load(), 0))
	}
	return lags
}

// destroyGrace bounds how long DestroySchema waits for the connector's own
// subscriptions to deliver the DESTROY_TABLE events of its steps before its
// last step takes the log away.
const destroyGrace = 5 * time.Second

// awaitLogReaders waits, until deadline at most, until this connector's
// subscriptions that follow the schema's log have delivered all it holds.
// Subscriptions of other connectors are woken by the steps' NOTIFY; one that
// has not read the log when it goes gets only the Resync with ErrLogGone.
func (c *Connector) awaitLogReaders(ctx context.Context, schema string, deadline time.Time) {
	channel := logChannel(schema)
	c.subsMu.RLock()
	var subs []*Subscription
	for s := range c.logSubs[channel] {
		subs = append(subs, s)
	}
	c.subsMu.RUnlock()
	if len(subs) == 0 {
		return
	}
	head, err := readHead(ctx, c.pool, schema)
	if err != nil {
		return // no log, or none to read: DestroySchema says why, if it matters
	}
	c.wakeLog(channel)
	for _, s := range subs {
		for s.logPos.Load() < head.position && time.Now().Before(deadline) && !closedChan(s.stopped) {
			if !backoff.Sleep(ctx, time.Millisecond) {
				return
			}
		}
	}
}

func closedChan(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// wakeLog wakes the subscriptions that follow the log of a channel.
func (c *Connector) wakeLog(channel string) {
	c.subsMu.RLock()
	defer c.subsMu.RUnlock()
	for s := range c.logSubs[channel] {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// logWritten is told by the flusher that a batch committed: it wakes this
// connector's own subscriptions at once. Other connectors' are woken by the
// log trigger's NOTIFY, sent at the commit.
func (c *Connector) logWritten() {
	if c.logged.Load() {
		c.wakeLog(logChannel(c.cfg.schema))
	}
}
