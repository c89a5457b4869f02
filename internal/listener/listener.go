// Package listener keeps one PostgreSQL connection LISTENing on a changing
// set of channels, through lost connections and server restarts.
package listener

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstore/pgstore/internal/backoff"
)

// Defaults of the Listener's timing fields.
const (
	DefaultPingAfter   = 10 * time.Second
	DefaultPingTimeout = 5 * time.Second
	DefaultMinBackoff  = 100 * time.Millisecond
	DefaultMaxBackoff  = 10 * time.Second
)

// A Listener owns one connection and LISTENs on every channel that has at
// least one Listen without a matching Unlisten. Run its loop with Run.
type Listener struct {
	// Connect opens the connection, which the Listener then owns and closes.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Notify is called on the loop's goroutine for each notification; it
	// must not block.
	Notify func(*pgconn.Notification)
	// Reconnected is called on the loop's goroutine when a lost connection
	// has been replaced and LISTENs again on every channel: notifications
	// sent meanwhile are lost, and none after this call will be.
	Reconnected func()
	// Logger receives connection losses and failed reconnections.
	Logger *slog.Logger
	// PingAfter is how long the connection may stay idle before it is
	// pinged to detect a silent loss, and PingTimeout how long the ping's
	// answer may take before the connection counts as lost. If 0, the
	// defaults are used.
	PingAfter, PingTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait between reconnection
	// attempts, which doubles, with jitter, from the first to the second.
	// If 0, the defaults are used.
	MinBackoff, MaxBackoff time.Duration

	initOnce  sync.Once
	stopped   chan struct{} // closed when Run returns
	mu        sync.Mutex
	channels  map[string]*channel
	interrupt context.CancelFunc // cancels the loop's current wait
	state     State
}

// State is where the Listener stands.
type State struct {
	// Listening: the connection is up and LISTENs on every channel
	// wanted when it connected; since Since.
	Listening bool
	Since     time.Time
	// Reconnects counts the lost connections replaced.
	Reconnects int64
}

// State returns where the Listener stands.
func (l *Listener) State() State {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

func (l *Listener) init() {
	l.initOnce.Do(func() {
		l.stopped = make(chan struct{})
		l.channels = make(map[string]*channel)
	})
}

// ErrStopped is returned by Listen once Run has returned.
var ErrStopped = errors.New("listener stopped")

type channel struct {
	refs      int
	listening bool          // the connection LISTENs on it
	announced bool          // ready is closed: listening, and wanted since
	ready     chan struct{} // what Listen waits for
}

// unannounce makes later Listen calls wait for a new LISTEN.
func (ch *channel) unannounce() {
	if ch.announced {
		ch.announced = false
		ch.ready = make(chan struct{})
	}
}

// Run keeps the connection and delivers notifications until ctx ends. Call
// it once, on its own goroutine.
func (l *Listener) Run(ctx context.Context) {
	l.init()
	defer close(l.stopped)
	var conn *pgx.Conn
	defer func() {
		l.mu.Lock()
		l.setListeningLocked(false)
		l.mu.Unlock()
		if conn != nil {
			closeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
			conn.Close(closeCtx)
			cancel()
		}
	}()
	// The backoff grows with every failure, connecting or after, and starts
	// over only once a connection has served: a server that accepts
	// connections and then drops them (a standby refusing LISTEN, a
	// pooler) must not make the loop spin.
	wait := backoff.Backoff{Min: l.minBackoff(), Max: l.maxBackoff()}
	retry := func(err error) {
		d := wait.Next()
		if conn != nil {
			conn = l.lost(ctx, conn, err)
		} else if ctx.Err() == nil {
			l.logger().Warn("pgstore: listener cannot connect; retrying", "retry_in", d, "err", err)
		}
		backoff.Sleep(ctx, d)
	}
	fresh, everListened := false, false
	for ctx.Err() == nil {
		if conn == nil {
			var err error
			if conn, err = l.Connect(ctx); err != nil {
				retry(err)
				continue
			}
			fresh = true
		}
		if err := l.apply(ctx, conn); err != nil {
			retry(err)
			continue
		}
		if fresh {
			// Only now that the channels are listened on again can a
			// subscriber's re-read miss nothing.
			fresh = false
			l.mu.Lock()
			l.setListeningLocked(true)
			if everListened {
				l.state.Reconnects++
			}
			l.mu.Unlock()
			if everListened {
				l.Reconnected()
			}
			everListened = true
		}
		if err := l.wait(ctx, conn); err != nil {
			retry(err)
			continue
		}
		wait.Reset() // the connection served
	}
}

// lost closes a failed connection and marks every channel as not listening.
func (l *Listener) lost(ctx context.Context, conn *pgx.Conn, err error) *pgx.Conn {
	if ctx.Err() == nil {
		l.logger().Warn("pgstore: listener connection lost; reconnecting", "err", err)
	}
	closeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
	conn.Close(closeCtx)
	cancel()
	l.mu.Lock()
	for _, ch := range l.channels {
		ch.listening = false
		ch.unannounce()
	}
	l.setListeningLocked(false)
	l.mu.Unlock()
	return nil
}

// setListeningLocked records whether the connection listens, since now if
// that changed.
func (l *Listener) setListeningLocked(listening bool) {
	if l.state.Listening != listening {
		l.state.Listening, l.state.Since = listening, time.Now()
	}
}

// nextChangeLocked finds a channel whose LISTEN state must change.
func (l *Listener) nextChangeLocked() (name string, listen, found bool) {
	for n, ch := range l.channels {
		if ch.refs > 0 && !ch.announced {
			return n, true, true
		}
		if ch.refs == 0 {
			return n, false, true
		}
	}
	return "", false, false
}

// apply brings the connection's LISTENs in line with the wanted channels.
func (l *Listener) apply(ctx context.Context, conn *pgx.Conn) error {
	for {
		l.mu.Lock()
		name, listen, found := l.nextChangeLocked()
		if found && !listen && !l.channels[name].listening {
			delete(l.channels, name)
			l.mu.Unlock()
			continue
		}
		l.mu.Unlock()
		if !found {
			return nil
		}
		sql := "UNLISTEN " + pgx.Identifier{name}.Sanitize()
		if listen {
			sql = "LISTEN " + pgx.Identifier{name}.Sanitize()
		}
		if _, err := conn.Exec(ctx, sql); err != nil {
			return err
		}
		l.mu.Lock()
		ch := l.channels[name]
		ch.listening = listen
		if listen && ch.refs > 0 {
			ch.announced = true
			close(ch.ready)
		}
		// Otherwise the references changed meanwhile: the next round
		// sees to it.
		l.mu.Unlock()
	}
}

// wait waits for one notification, an interruption or the idle timeout,
// after which it pings the server.
func (l *Listener) wait(ctx context.Context, conn *pgx.Conn) error {
	waitCtx, cancel := context.WithTimeout(ctx, l.pingAfter())
	defer cancel()
	l.mu.Lock()
	if _, _, found := l.nextChangeLocked(); found {
		l.mu.Unlock()
		return nil // a change came in after apply looked
	}
	l.interrupt = cancel
	l.mu.Unlock()
	n, err := conn.WaitForNotification(waitCtx)
	l.mu.Lock()
	l.interrupt = nil
	l.mu.Unlock()
	switch {
	case err == nil:
		l.Notify(n)
		return nil
	case ctx.Err() != nil:
		return nil
	case errors.Is(waitCtx.Err(), context.DeadlineExceeded):
		pingCtx, cancel := context.WithTimeout(ctx, l.pingTimeout())
		defer cancel()
		return conn.Ping(pingCtx)
	case waitCtx.Err() != nil && !conn.IsClosed():
		return nil // interrupted to LISTEN or UNLISTEN
	}
	return err
}

// Listen adds a reference to a channel and waits until the connection
// LISTENs on it: a notification committed after Listen returns is
// delivered. If ctx ends first, the reference is dropped again.
func (l *Listener) Listen(ctx context.Context, name string) error {
	l.init()
	l.mu.Lock()
	ch := l.channels[name]
	if ch == nil {
		ch = &channel{ready: make(chan struct{})}
		l.channels[name] = ch
	}
	ch.refs++
	ready := ch.ready
	l.interruptLocked()
	l.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		l.Unlisten(name)
		return ctx.Err()
	case <-l.stopped:
		return ErrStopped
	}
}

// Unlisten drops a reference taken by Listen; the channel is no longer
// listened on once it has none.
func (l *Listener) Unlisten(name string) {
	l.init()
	l.mu.Lock()
	defer l.mu.Unlock()
	if ch := l.channels[name]; ch != nil && ch.refs > 0 {
		ch.refs--
		if ch.refs == 0 {
			ch.unannounce()
			l.interruptLocked()
		}
	}
}

func (l *Listener) interruptLocked() {
	if l.interrupt != nil {
		l.interrupt()
	}
}

func (l *Listener) logger() *slog.Logger {
	if l.Logger == nil {
		return slog.Default()
	}
	return l.Logger
}

func (l *Listener) pingAfter() time.Duration {
	if l.PingAfter > 0 {
		return l.PingAfter
	}
	return DefaultPingAfter
}

func (l *Listener) pingTimeout() time.Duration {
	if l.PingTimeout > 0 {
		return l.PingTimeout
	}
	return DefaultPingTimeout
}

func (l *Listener) minBackoff() time.Duration {
	if l.MinBackoff > 0 {
		return l.MinBackoff
	}
	return DefaultMinBackoff
}

func (l *Listener) maxBackoff() time.Duration {
	if l.MaxBackoff > 0 {
		return l.MaxBackoff
	}
	return DefaultMaxBackoff
}
