package mapbroker

import (
	"cmp"
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Group commit.
//
// Every change holds the log's head from its first round trip to its
// commit, so changes of a schema commit one at a time, each paying a round
// trip and a WAL flush. Changes of one channel that wait for each other
// are therefore made together: one transaction reads what all of them
// need, decides them one after the other (each seeing what those before it
// wrote, as if they had run alone in that order), and commits them at once.
// A change learns its result only when the group's COMMIT is answered.
//
// A group that cannot finish (the channel being made or cleared, a
// statement refused, a deadlock) writes nothing, and each of its changes
// runs again alone, with its caller's context, where the single change's
// rules apply. A group whose COMMIT was sent and not answered reports
// ErrOutcomeUnknown to each change that wrote, as a single change would.

// maxGroup bounds the changes that one transaction makes.
const maxGroup = 64

// A queuedChange waits for its group.
type queuedChange struct {
	ctx    context.Context // the caller's
	req    changeReq
	decide func(*txState) (*plan, error)
	done   chan error // errAlone: run it alone
}

// errAlone tells a queued change to run in a transaction of its own.
var errAlone = errors.New("mapbroker: run the change alone")

// A changeQueue holds the changes of one channel that wait for a group;
// while it has any, one goroutine makes groups of them, one at a time: the
// changes queue while a group runs, and so make the next. (Two groups at
// once, one waiting for the head while the other commits, split the
// waiting changes and measured slower.)
type changeQueue struct {
	pending []*queuedChange
	arrived chan struct{} // a change was queued
}

type changeQueues struct {
	mu       sync.Mutex
	channels map[string]*changeQueue
	// For tests: the changes taken into groups, the most one group
	// committed, and the groups that failed and left their changes alone.
	taken, largest, failed atomic.Int64
}

// change runs one map change: decide sees what was read of the channel
// (and what the changes before it in its group wrote) and returns what to
// write.
func (b *Broker) change(ctx context.Context, req changeReq, decide func(*txState) (*plan, error)) error {
	if req.expired || !b.tableKnown(req.ch) {
		// Expiry runs from the janitor, alone; a channel without a known
		// table goes through making it.
		return b.changeAlone(ctx, req, decide)
	}
	qc := &queuedChange{ctx: ctx, req: req, decide: decide, done: make(chan error, 1)}
	b.enqueue(qc)
	var err error
	select {
	case err = <-qc.done:
	case <-ctx.Done():
		if b.dequeue(qc) {
			return b.changeAlone(ctx, req, decide) // which reports ctx's error
		}
		err = <-qc.done // taken into a group, whose COMMIT is bounded
	}
	if errors.Is(err, errAlone) {
		return b.changeAlone(ctx, req, decide)
	}
	return err
}

func (b *Broker) enqueue(qc *queuedChange) {
	q := &b.queues
	q.mu.Lock()
	defer q.mu.Unlock()
	cq := q.channels[qc.req.ch]
	if cq == nil {
		cq = &changeQueue{arrived: make(chan struct{}, 1)}
		q.channels[qc.req.ch] = cq
		go b.makeGroups(qc.req.ch, cq)
	}
	cq.pending = append(cq.pending, qc)
	select {
	case cq.arrived <- struct{}{}:
	default:
	}
}

// dequeue takes a change out of its queue, and reports false when a group
// took it first.
func (b *Broker) dequeue(qc *queuedChange) bool {
	q := &b.queues
	q.mu.Lock()
	defer q.mu.Unlock()
	cq := q.channels[qc.req.ch]
	if cq == nil {
		return false
	}
	i := slices.Index(cq.pending, qc)
	if i < 0 {
		return false
	}
	cq.pending = slices.Delete(cq.pending, i, i+1)
	return true
}

// makeGroups makes groups of a channel's queued changes until none wait.
func (b *Broker) makeGroups(ch string, cq *changeQueue) {
	q := &b.queues
	last := 0 // the size of the last group
	for {
		if last > 1 {
			b.linger(cq, last)
		}
		q.mu.Lock()
		n := min(len(cq.pending), maxGroup)
		if n == 0 {
			delete(q.channels, ch)
			q.mu.Unlock()
			return
		}
		group := slices.Clone(cq.pending[:n])
		cq.pending = slices.Delete(cq.pending, 0, n)
		q.taken.Add(int64(n))
		q.mu.Unlock()
		b.runGroup(ch, group)
		last = len(group)
	}
}

// waves splits a group, in call order, into waves of changes of distinct
// keys: a key's first change is in the first wave, its second in the
// second, and so on. It returns indexes into group.
func waves(group []*queuedChange) [][]int {
	var ws [][]int
	seen := map[string]int{}
	for i, c := range group {
		key := c.req.keys[0]
		w := seen[key]
		seen[key]++
		if w == len(ws) {
			ws = append(ws, nil)
		}
		ws[w] = append(ws[w], i)
	}
	return ws
}

// groupLinger is how long a group waits for as many changes as the last
// one had. The callers that the last group answered are likely to come
// back at once; without the wait, the next group would take the first of
// them alone, and the groups would alternate between one change and the
// rest. Changes that come one at a time never wait.
const groupLinger = 200 * time.Microsecond

func (b *Broker) linger(cq *changeQueue, want int) {
	q := &b.queues
	timer := time.NewTimer(groupLinger)
	defer timer.Stop()
	for {
		q.mu.Lock()
		n := len(cq.pending)
		q.mu.Unlock()
		if n >= want {
			return
		}
		select {
		case <-cq.arrived:
		case <-timer.C:
			return
		}
	}
}

// runGroup makes a group's changes in one transaction, and tells each its
// result.
func (b *Broker) runGroup(ch string, group []*queuedChange) {
	results := make([]error, len(group))
	for i := range results {
		results[i] = errAlone
	}
	defer func() {
		for i, c := range group {
			c.done <- results[i]
		}
	}()

	// Until its COMMIT is sent, the group stops when any of its callers
	// gives up, and each change runs alone, with its caller's context.
	ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
	defer cancel()
	for _, c := range group {
		defer context.AfterFunc(c.ctx, cancel)()
	}
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return
	}
	defer release(conn)
	var keys, idemKeys []string
	for _, c := range group {
		keys = append(keys, c.req.keys...)
		if c.req.idemKey != "" {
			idemKeys = append(idemKeys, c.req.idemKey)
		}
	}
	slices.Sort(keys)
	slices.Sort(idemKeys)
	st, err := b.readChange(ctx, conn, changeReq{ch: ch, keys: slices.Compact(keys)}, slices.Compact(idemKeys), true)
	switch {
	case isUndefinedTable(err):
		b.setKnown(ch, false)
		return
	case err != nil || !st.locked || !st.meta.ready():
		return
	}

	var batch pgx.Batch
	expiry := map[string]time.Duration{}
	var renewMeta *pgx.QueuedQuery
	wrote := make([]bool, len(group))
	decided := make([]error, len(group))
	epoch := st.meta.epoch()
	// The kind of record write change i would make, as the records stand.
	kind := func(i int) opKind {
		if group[i].req.removes {
			return opDelete
		}
		if _, ok := st.records[group[i].req.keys[0]]; ok {
			return opUpdate
		}
		return opInsert
	}
	for _, wave := range waves(group) {
		// The wave's records are written a statement per kind, whose log
		// trigger numbers their entries in key order: decided in that
		// order, each change predicts its entry's position.
		slices.SortFunc(wave, func(i, j int) int {
			return cmp.Or(cmp.Compare(kind(i), kind(j)), cmp.Compare(group[i].req.keys[0], group[j].req.keys[0]))
		})
		var ops []recordOp
		var rest []*pgx.QueuedQuery
		for _, i := range wave {
			c := group[i]
			p, err := c.decide(st)
			switch {
			case err != nil:
				decided[i] = err
				continue
			case p == nil:
				continue
			case p.needLife:
				return // cannot be: the channel is ready
			}
			ops = append(ops, p.ops...)
			rest = append(rest, p.batch.QueuedQueries...)
			maps.Copy(expiry, p.expiry)
			renewMeta = cmp.Or(p.meta, renewMeta)
			wrote[i] = true
			for key, r := range p.records {
				if r == nil {
					delete(st.records, key)
				} else {
					st.records[key] = *r
				}
			}
			if p.off != 0 {
				st.meta.off, st.meta.position = p.off, p.pos
			}
			if p.idem != nil {
				st.idems[c.req.idemKey] = p.idem
			}
		}
		b.queueOps(&batch, ch, ops, epoch)
		batch.QueuedQueries = append(batch.QueuedQueries, rest...)
	}
	if len(batch.QueuedQueries) > 0 || renewMeta != nil {
		b.queueTail(&batch, ch, expiry, renewMeta)
		err := commit(ctx, conn, &batch)
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			// The most of any group, whichever channel's commits first.
			n := int64(len(group))
			for was := b.queues.largest.Load(); n > was; was = b.queues.largest.Load() {
				if b.queues.largest.CompareAndSwap(was, n) {
					break
				}
			}
		case errors.As(err, &pgErr) || pgconn.SafeToRetry(err):
			b.queues.failed.Add(1)
			return // nothing committed: each alone
		default:
			// What wrote may have committed; what only read saw it, and
			// reads again.
			for i := range group {
				if wrote[i] {
					results[i] = outcomeLost(ch, err)
				}
			}
			return
		}
	}
	copy(results, decided)
}
