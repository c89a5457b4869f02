package mapbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// How a change is made atomic.
//
// pgstore's Set is buffered and unconditional; a map change is conditional
// (idempotency, version, key mode, compare-and-swap), so it is one
// transaction of the broker's own, on the record table and the broker's
// tables, in two round trips:
//
//  1. BEGIN; the channel's advisory lock, shared (tried for, not waited
//     for), then the log's head row FOR UPDATE; the channel's meta (the
//     table's oid and last offset, the channel's life); the idempotency
//     results; the records of the keys.
//  2. The records' INSERT, UPDATE or DELETE; the broker's stream index
//     rows; the idempotency results; the keys' expiry; COMMIT.
//
// The head row is the lock that pgstore's batches and every record table's
// BEFORE STATEMENT trigger take first, and hold to their commit. Holding it,
// the change is the only writer of the schema's log: what it read cannot
// change before it commits, and its statements take the next positions and
// the table's next offsets, in key order within each statement, which it
// can so predict, write into the records (their version) and the index, and
// check (see queueOps and streamWrite).
// The meta is read in a statement after the lock's, so that its snapshot
// sees every writer that held the head before.
//
// The channel's advisory lock is taken exclusive by what makes or ends the
// channel's table (ensure, Clear); changes take it shared, before the head,
// so they never see a table half made, and a Clear never drops a change
// that committed after it looked. A change that cannot have it gives its
// connection back and tries again (see retry).
//
// Changes of one channel that wait for each other share the transaction:
// see group.go.

// commitTimeout bounds a change's second round trip, the one with its
// COMMIT, which the caller's context does not cut short (see changeOnce).
const commitTimeout = 30 * time.Second

// changeAttempts bounds how often a change or a read starts again: when
// the table turned out to exist or not, or had to be made first.
const changeAttempts = 5

// A changeReq is what a change reads in its first round trip.
type changeReq struct {
	ch      string
	keys    []string
	idemKey string
	removes bool // a Remove: it deletes its key, if it writes
	expired bool // also read which of keys have expired (see expireKeys)
}

// A txState is what a change read.
type txState struct {
	locked  bool // the channel's lock and the log's head are held
	meta    meta
	idems   map[string]*centrifuge.StreamPosition // by idempotency key, of the channel's epoch
	records map[string]record
	expired map[string]bool
}

type record struct {
	version int64
	raw     []byte // the record's JSON
	entry   entry
}

// A plan is what a change decided to write; nil writes nothing.
type plan struct {
	ops      []recordOp // by kind, then key (see queueOps)
	batch    pgx.Batch  // the rest, after ops
	needLife bool       // the change writes, and the channel has no table yet
	off, pos int64
	// What the change leaves behind, for the changes after it in a group:
	// the records of the keys it wrote (nil: removed), and the result its
	// idempotency key now repeats.
	records map[string]*record
	idem    *centrifuge.StreamPosition
	// What a group makes once for all its changes, after their writes:
	// the keys' expiry (their KeyTTL; 0: none), and the renewal of the
	// channel's MetaTTL.
	expiry map[string]time.Duration
	meta   *pgx.QueuedQuery
}

// expire records that the change leaves key with ttl to live (0: forever).
func (p *plan) expire(key string, ttl time.Duration) {
	if p.expiry == nil {
		p.expiry = make(map[string]time.Duration, 1)
	}
	p.expiry[key] = max(ttl, 0)
}

// queueTail queues, after the writes of one change or of a group, the keys'
// expiry and the renewal of the channel's MetaTTL.
func (b *Broker) queueTail(batch *pgx.Batch, ch string, expiry map[string]time.Duration, meta *pgx.QueuedQuery) {
	var forever []string
	for _, key := range slices.Sorted(maps.Keys(expiry)) {
		if ttl := expiry[key]; ttl > 0 {
			batch.Queue(b.sql.expirySet, ch, key, ttl)
		} else {
			forever = append(forever, key)
		}
	}
	if len(forever) > 0 {
		batch.Queue(b.sql.expiryDelete, ch, forever)
	}
	if meta != nil {
		batch.QueuedQueries = append(batch.QueuedQueries, meta)
	}
}

// A recordOp is a change's write of a record, and its entry: the log's
// position and the table's offset the entry takes, and what the broker's
// stream index keeps of it.
type recordOp struct {
	kind     opKind
	key      string
	val      []byte // the record's JSON; nil for a removal
	off, pos int64
	roff     int64  // the stream offset
	tags     []byte // of a removal
	prev     []byte // of a delta publication: the entry it replaces
}

type opKind int

const (
	opInsert opKind = iota
	opUpdate
	opDelete
)

// queueOps queues record writes a statement for each run of ops of one
// kind in increasing key order, which is the order the statement's log
// trigger numbers their entries in; each statement is followed by the
// stream index rows of its entries, which checks that they ended where
// predicted. Those who plan ops so predict them in that order: a group
// decides its changes of one kind in key order (see runGroup).
func (b *Broker) queueOps(batch *pgx.Batch, ch string, ops []recordOp, epoch string) {
	for len(ops) > 0 {
		n := 1
		for n < len(ops) && ops[n].kind == ops[0].kind && ops[n].key > ops[n-1].key {
			n++
		}
		run := ops[:n]
		ops = ops[n:]
		keys := make([]string, n)
		versions := make([]int64, n)
		vals := make([][]byte, n)
		offs := make([]int64, n)
		positions := make([]int64, n)
		tags := make([][]byte, n)
		prevs := make([][]byte, n)
		for i, op := range run {
			keys[i], versions[i], vals[i] = op.key, op.roff, op.val
			offs[i], positions[i], tags[i], prevs[i] = op.off, op.pos, op.tags, op.prev
		}
		switch run[0].kind {
		case opInsert:
			batch.Queue(b.sql.recordInsert(ch), keys, versions, vals)
		case opUpdate:
			batch.Queue(b.sql.recordUpdate(ch), keys, versions, vals)
		case opDelete:
			batch.Queue(b.sql.recordDelete(ch), keys)
		}
		last := run[n-1]
		batch.Queue(b.sql.streamWrite, ch, last.off, last.pos, epoch, keys, offs, positions, versions, tags, prevs)
	}
}

// wrote records that the change leaves key's record as r (nil: removed).
func (p *plan) wrote(key string, r *record) {
	if p.records == nil {
		p.records = make(map[string]*record, 1)
	}
	p.records[key] = r
}

// next returns the table offset and the log position of the next entry the
// change writes.
func (p *plan) next(m meta) (off, pos int64) {
	if p.off == 0 {
		p.off, p.pos = m.off, m.position
	}
	p.off++
	p.pos++
	return p.off, p.pos
}

// What a change or a read that cannot finish yet does next, once it has
// given its connection back: a transaction that waited for ensure while
// holding one could starve the pool that pgstore needs to make the table.
type step int

const (
	done     step = iota
	again         // start again at once: the table turned out to exist, or not
	needLife      // start the channel's life (ensure), then again
	lockBusy      // the channel is being made or cleared: wait, then again
)

// changeAlone runs one map change in a transaction of its own: decide sees
// what the first round trip read and returns what to write.
func (b *Broker) changeAlone(ctx context.Context, req changeReq, decide func(*txState) (*plan, error)) error {
	return b.retry(ctx, req.ch, func() (step, error) { return b.changeOnce(ctx, req, decide) })
}

// retry runs once until it is done, ensuring the channel or waiting for
// its lock between attempts, without holding a connection meanwhile.
func (b *Broker) retry(ctx context.Context, ch string, once func() (step, error)) error {
	wait := 2 * time.Millisecond
	for attempts := 0; attempts < changeAttempts; {
		n, err := once()
		switch {
		case err != nil:
			return err
		case n == done:
			return nil
		case n == lockBusy:
			// Not an attempt: Clear or ensure holds the channel for as
			// long as a DDL statement takes.
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("mapbroker: channel %q: waiting for the channel's table to be made or dropped: %w", ch, ctx.Err())
			case <-t.C:
			}
			wait = min(2*wait, 100*time.Millisecond)
			continue
		case n == needLife:
			if err := b.ensure(ctx, ch); err != nil {
				return err
			}
		}
		attempts++
	}
	return fmt.Errorf("mapbroker: channel %q: started %d times without settling whether the channel's table exists", ch, changeAttempts)
}

func (b *Broker) changeOnce(ctx context.Context, req changeReq, decide func(*txState) (*plan, error)) (step, error) {
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return done, fmt.Errorf("mapbroker: %w", err)
	}
	defer release(conn)
	withRecords := b.tableKnown(req.ch)
	var idemKeys []string
	if req.idemKey != "" {
		idemKeys = []string{req.idemKey}
	}
	st, err := b.readChange(ctx, conn, req, idemKeys, withRecords)
	switch {
	case isUndefinedTable(err) && withRecords:
		b.setKnown(req.ch, false)
		return again, nil
	case err != nil:
		return done, fmt.Errorf("mapbroker: channel %q: %w", req.ch, err)
	case !st.locked:
		return lockBusy, nil
	}
	m := st.meta
	b.setKnown(req.ch, m.exists())
	switch {
	case m.exists() && !withRecords && len(req.keys) > 0:
		return again, nil // read again, with the records
	case m.exists() && !m.ready():
		return needLife, nil
	}
	p, err := decide(st)
	if err != nil || p == nil {
		return done, err
	}
	if p.needLife {
		return needLife, nil
	}
	var batch pgx.Batch
	b.queueOps(&batch, req.ch, p.ops, m.epoch())
	batch.QueuedQueries = append(batch.QueuedQueries, p.batch.QueuedQueries...)
	b.queueTail(&batch, req.ch, p.expiry, p.meta)
	err = commit(ctx, conn, &batch)
	if err == nil {
		return done, nil
	}
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "23502" && pgErr.TableName == streamTable:
		return done, fmt.Errorf("mapbroker: channel %q: pgstore's change log did not record the change as the broker expected (are its INSERT, UPDATE and DELETE events switched off with pgstore.WithEvents?): %w", req.ch, err)
	case errors.As(err, &pgErr):
		if pgErr.Code == "40001" || pgErr.Code == "40P01" {
			return again, nil // nothing committed: start again
		}
		return done, fmt.Errorf("mapbroker: channel %q: %w", req.ch, err)
	case pgconn.SafeToRetry(err):
		return done, fmt.Errorf("mapbroker: channel %q: the change was not sent: %w", req.ch, err)
	}
	return done, outcomeLost(req.ch, err)
}

// commit sends a change's writes with its COMMIT. Not cut short by ctx:
// cancelled with its COMMIT sent, the change could still commit, after
// Publish returned ErrOutcomeUnknown, and reads made meanwhile would miss
// what reads made later see. The round trip is bounded instead; only an
// answer that does not come leaves the outcome unknown.
func commit(ctx context.Context, conn *pgxpool.Conn, batch *pgx.Batch) error {
	batch.Queue("COMMIT")
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	return conn.SendBatch(ctx, batch).Close()
}

// outcomeLost is the error of a change whose COMMIT was sent and whose
// answer did not come: it may have been applied.
func outcomeLost(ch string, err error) error {
	return fmt.Errorf("mapbroker: channel %q: %w: the answer to a change sent with its COMMIT was lost: %w", ch, ErrOutcomeUnknown, err)
}

// readChange runs the first round trip of a change, or of a group of
// changes of one channel: req.keys are all their keys, and idemKeys their
// idempotency keys.
func (b *Broker) readChange(ctx context.Context, conn *pgxpool.Conn, req changeReq, idemKeys []string, withRecords bool) (*txState, error) {
	st := &txState{records: make(map[string]record), expired: make(map[string]bool), idems: make(map[string]*centrifuge.StreamPosition)}
	var rb pgx.Batch
	rb.Queue("BEGIN")
	rb.Queue(b.sql.lockHead, lockClass, b.lockKey(req.ch), b.sql.schema).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			st.locked = true
		}
		return rows.Err()
	})
	rb.Queue(b.sql.meta, req.ch, b.sql.schema).QueryRow(func(row pgx.Row) error {
		return row.Scan(st.meta.scan()...)
	})
	if len(idemKeys) > 0 {
		// After the meta's, whose callback runs first: a result of an
		// earlier epoch is of an earlier life, and forgotten.
		rb.Queue(b.sql.idemRead, req.ch, idemKeys).Query(func(rows pgx.Rows) error {
			var key string
			var sp centrifuge.StreamPosition
			_, err := pgx.ForEachRow(rows, []any{&key, &sp.Epoch, &sp.Offset}, func() error {
				if sp.Epoch == st.meta.epoch() {
					st.idems[key] = &centrifuge.StreamPosition{Offset: sp.Offset, Epoch: sp.Epoch}
				}
				return nil
			})
			return err
		})
	}
	if req.expired {
		rb.Queue(b.sql.keysExpired, req.ch, req.keys).Query(func(rows pgx.Rows) error {
			var id string
			_, err := pgx.ForEachRow(rows, []any{&id}, func() error {
				st.expired[id] = true
				return nil
			})
			return err
		})
	}
	if withRecords && len(req.keys) > 0 {
		rb.Queue(b.sql.recordRead(req.ch), req.keys).Query(func(rows pgx.Rows) error {
			var id string
			var r record
			_, err := pgx.ForEachRow(rows, []any{&id, &r.version, &r.raw}, func() error {
				r.entry = decodeEntry(r.raw)
				st.records[id] = r
				r = record{}
				return nil
			})
			return err
		})
	}
	if err := conn.SendBatch(ctx, &rb).Close(); err != nil {
		return nil, err
	}
	return st, nil
}

// release returns a connection to the pool, rolling back what it left open;
// one that cannot say so is destroyed by the pool.
func release(conn *pgxpool.Conn) {
	rollback(conn)
	conn.Release()
}

func rollback(conn *pgxpool.Conn) {
	if conn.Conn().PgConn().TxStatus() == 'I' || conn.Conn().IsClosed() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = conn.Exec(ctx, "ROLLBACK")
}

// Publish writes a key's entry and appends it to the channel's stream, in
// one transaction, unless the idempotency key, the version, the key mode
// or the expected position suppresses it (checked in that order, as
// centrifuge's brokers do).
func (b *Broker) Publish(ctx context.Context, ch string, key string, opts centrifuge.MapPublishOptions) (centrifuge.MapUpdateResult, error) {
	chOpts, err := b.channelOptions(ch)
	if err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if err := checkKey(key); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if opts.KeyMode != centrifuge.KeyModeReplace && opts.KeyMode != centrifuge.KeyModeIfNew && opts.KeyMode != centrifuge.KeyModeIfExists {
		return centrifuge.MapUpdateResult{}, fmt.Errorf("%w: KeyMode %q", ErrUnsupported, opts.KeyMode)
	}
	if err := checkText("IdempotencyKey", opts.IdempotencyKey); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if err := checkPublication(opts); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	now := time.Now().UnixMilli()
	var res centrifuge.MapUpdateResult
	err = b.change(ctx, changeReq{ch: ch, keys: []string{key}, idemKey: opts.IdempotencyKey}, func(st *txState) (*plan, error) {
		m := st.meta
		epoch := m.epoch()
		var repeated bool
		if res, repeated = startResult(st, opts.IdempotencyKey); repeated {
			return nil, nil
		}
		rec, exists := st.records[key]
		version, versionEpoch := opts.Version, opts.VersionEpoch
		if exists {
			v, ve := rec.entry.version()
			if opts.Version > 0 && (opts.VersionEpoch == "" || opts.VersionEpoch == ve) && opts.Version <= v {
				suppress(&res, centrifuge.SuppressReasonVersion)
				return nil, nil
			}
			if opts.Version == 0 {
				// A publication without a version keeps the stored one,
				// so that a late older version is still refused.
				version, versionEpoch = v, ve
			}
		}
		switch {
		case opts.KeyMode == centrifuge.KeyModeIfNew && exists:
			suppress(&res, centrifuge.SuppressReasonKeyExists)
			if !opts.RefreshTTLOnSuppress || chOpts.KeyTTL <= 0 {
				return nil, nil
			}
			p := &plan{}
			p.batch.Queue(b.sql.expiryRefresh, ch, key, chOpts.KeyTTL)
			b.queueMeta(p, ch, m, chOpts)
			return p, nil
		case opts.KeyMode == centrifuge.KeyModeIfExists && !exists:
			suppress(&res, centrifuge.SuppressReasonKeyNotFound)
			return nil, nil
		}
		if mismatch, err := positionMismatch(&res, opts.ExpectedPosition, key, rec, exists, epoch); mismatch || err != nil {
			return nil, err
		}
		if !m.ready() {
			return &plan{needLife: true}, nil
		}
		env := newEnvelope(epoch, opts, version, versionEpoch, now)
		val, err := json.Marshal(env)
		if err != nil {
			return nil, err
		}
		p := &plan{}
		off, pos := p.next(m)
		roff := off - *m.base
		op := recordOp{kind: opInsert, key: key, val: val, off: off, pos: pos, roff: roff}
		if exists {
			op.kind = opUpdate
			if opts.UseDelta {
				op.prev = rec.raw
			}
		}
		p.ops = append(p.ops, op)
		p.wrote(key, &record{version: roff, raw: val, entry: entry{env: env}})
		b.queueIdempotency(p, ch, opts.IdempotencyKey, opts.IdempotentResultTTL, epoch, roff)
		p.expire(key, chOpts.KeyTTL)
		b.queueMeta(p, ch, m, chOpts)
		res.Position = centrifuge.StreamPosition{Offset: uint64(roff), Epoch: epoch}
		return p, nil
	})
	if err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	return res, nil
}

// Remove deletes a key and appends its removal to the channel's stream, in
// one transaction, unless the idempotency key or the expected position
// suppresses it, or the key does not exist.
func (b *Broker) Remove(ctx context.Context, ch string, key string, opts centrifuge.MapRemoveOptions) (centrifuge.MapUpdateResult, error) {
	chOpts, err := b.channelOptions(ch)
	if err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if err := checkKey(key); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if err := checkText("IdempotencyKey", opts.IdempotencyKey); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	if err := checkTags(opts.Tags); err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	var res centrifuge.MapUpdateResult
	err = b.change(ctx, changeReq{ch: ch, keys: []string{key}, idemKey: opts.IdempotencyKey, removes: true}, func(st *txState) (*plan, error) {
		m := st.meta
		epoch := m.epoch()
		var repeated bool
		if res, repeated = startResult(st, opts.IdempotencyKey); repeated {
			return nil, nil
		}
		rec, exists := st.records[key]
		// Compare-and-swap first: a caller that expects a position must
		// hear that the key moved on, even when it is gone.
		if mismatch, err := positionMismatch(&res, opts.ExpectedPosition, key, rec, exists, epoch); mismatch || err != nil {
			return nil, err
		}
		if !exists {
			suppress(&res, centrifuge.SuppressReasonKeyNotFound)
			return nil, nil
		}
		tags := rec.entry.tags()
		if opts.Tags != nil {
			tags = opts.Tags
		}
		p := &plan{}
		roff := b.queueRemoval(p, m, key, tags)
		b.queueIdempotency(p, ch, opts.IdempotencyKey, opts.IdempotentResultTTL, epoch, roff)
		p.expire(key, 0)
		b.queueMeta(p, ch, m, chOpts)
		res.Position = centrifuge.StreamPosition{Offset: uint64(roff), Epoch: epoch}
		return p, nil
	})
	if err != nil {
		return centrifuge.MapUpdateResult{}, err
	}
	return res, nil
}

// queueRemoval queues the deletion of a key and its stream index row, and
// returns the removal's stream offset.
func (b *Broker) queueRemoval(p *plan, m meta, key string, tags map[string]string) int64 {
	off, pos := p.next(m)
	roff := off - *m.base
	p.ops = append(p.ops, recordOp{kind: opDelete, key: key, off: off, pos: pos, roff: roff, tags: tagsJSON(tags)})
	p.wrote(key, nil)
	return roff
}

func (b *Broker) queueIdempotency(p *plan, ch, key string, ttl time.Duration, epoch string, roff int64) {
	if key == "" {
		return
	}
	if ttl <= 0 {
		ttl = b.cfg.IdempotentResultTTL
	}
	p.batch.Queue(b.sql.idemWrite, ch, key, epoch, roff, ttl)
	p.idem = &centrifuge.StreamPosition{Offset: uint64(roff), Epoch: epoch}
}

// queueMeta queues the renewal of the channel's MetaTTL.
func (b *Broker) queueMeta(p *plan, ch string, m meta, chOpts centrifuge.MapChannelOptions) {
	if m.base == nil {
		return
	}
	if chOpts.MetaTTL > 0 {
		p.meta = &pgx.QueuedQuery{SQL: b.sql.metaTouch, Arguments: []any{ch, *m.base, chOpts.MetaTTL}}
	} else {
		p.meta = &pgx.QueuedQuery{SQL: b.sql.metaClear, Arguments: []any{ch, *m.base}}
	}
}

// expireKeys removes keys of a channel whose KeyTTL passed, each removal an
// entry of the stream with the key's tags, as Remove would.
func (b *Broker) expireKeys(ctx context.Context, ch string, keys []string) error {
	sort.Strings(keys)
	return b.change(ctx, changeReq{ch: ch, keys: keys, expired: true}, func(st *txState) (*plan, error) {
		var gone []string
		for _, key := range keys {
			if st.expired[key] {
				gone = append(gone, key)
			}
		}
		if len(gone) == 0 {
			return nil, nil
		}
		p := &plan{}
		for _, key := range gone {
			rec, exists := st.records[key]
			if !exists {
				continue
			}
			b.queueRemoval(p, st.meta, key, rec.entry.tags())
		}
		for _, key := range gone {
			p.expire(key, 0)
		}
		return p, nil
	})
}

// offsetOf is the stream offset a record's version holds; a record written
// to the table without the broker may hold any version.
func offsetOf(version int64) uint64 {
	return uint64(max(version, 0))
}

// startResult starts a change's result at the channel's position; when the
// change's idempotency key (if any) was seen before, it is that change's
// result, suppressed, and repeated reports it.
func startResult(st *txState, idemKey string) (res centrifuge.MapUpdateResult, repeated bool) {
	res = centrifuge.MapUpdateResult{Position: st.meta.streamPosition()}
	if sp := st.idems[idemKey]; idemKey != "" && sp != nil {
		res.Position = *sp
		suppress(&res, centrifuge.SuppressReasonIdempotency)
		return res, true
	}
	return res, false
}

func suppress(res *centrifuge.MapUpdateResult, reason centrifuge.SuppressReason) {
	res.Suppressed, res.SuppressReason = true, reason
}

// positionMismatch applies a change's compare-and-swap: when the key is not
// at the expected position (or gone), it suppresses the change in res, with
// the key's current entry if it has one, and reports true.
func positionMismatch(res *centrifuge.MapUpdateResult, exp *centrifuge.StreamPosition, key string, rec record, exists bool, epoch string) (bool, error) {
	if exp == nil {
		return false, nil
	}
	if exists && offsetOf(rec.version) == exp.Offset && epoch == exp.Epoch {
		return false, nil
	}
	suppress(res, centrifuge.SuppressReasonPositionMismatch)
	if !exists {
		return true, nil
	}
	pub, err := rec.entry.publication(key, offsetOf(rec.version))
	if err != nil {
		return true, err
	}
	res.CurrentEntry = &centrifuge.MapCurrentEntry{Offset: offsetOf(rec.version), Data: pub.Data}
	return true, nil
}
