package pgstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// What a failed attempt means for its batch: retried only when it can pass,
// resolved when its commit may have been sent. No server needed.
func TestAnAttemptsErrorIsRetriedOnlyWhenTheSameBatchCanPass(t *testing.T) {
	pg := func(code string) error { return fmt.Errorf("batch: %w", &pgconn.PgError{Code: code}) }
	live := context.Background()
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		err  error
		want writebuf.Failure
	}{
		{"serialization failure", live, pg("40001"), writebuf.Transient},
		{"deadlock", live, pg("40P01"), writebuf.Transient},
		{"admin shutdown", live, pg("57P01"), writebuf.Transient},
		{"idle-session timeout ends the session", live, pg("57P05"), writebuf.Transient},
		{"idle-in-transaction timeout ends the session", live, pg("25P03"), writebuf.Transient},
		{"read-only standby after a failover", live, pg("25006"), writebuf.Transient},
		{"lock timeout", live, pg("55P03"), writebuf.Transient},
		{"connection exception", live, pg("08006"), writebuf.Transient},
		{"too many connections", live, pg("53300"), writebuf.Transient},
		{"a statement timeout: the batch is too large", live, pg("57014"), writebuf.TooLarge},
		{"a cancel of our own making", ended, pg("57014"), writebuf.Transient},
		{"a refused value", live, pg("22P02"), writebuf.Permanent},
		{"a trigger's refusal", live, pg("P0001"), writebuf.Permanent},
		{"no privilege", live, pg("42501"), writebuf.Permanent},
		{"the caller closed its pool", live, fmt.Errorf("acquire: %w", puddle.ErrClosedPool), writebuf.Permanent},
		{"a client-side encoding error", live, errors.New("unable to encode 1 into text format"), writebuf.Permanent},
		{"a connection that failed to open", live, &pgconn.ConnectError{}, writebuf.Transient},
		{"a connection lost after sending", live, fmt.Errorf("read: %w", &net.OpError{Op: "read", Err: errors.New("reset")}), writebuf.Unknown},
		{"an end of file after sending", live, fmt.Errorf("receive: %w", io.ErrUnexpectedEOF), writebuf.Unknown},
		{"an attempt that timed out after sending", live, fmt.Errorf("wait: %w", context.DeadlineExceeded), writebuf.Unknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, classify(tc.ctx, tc.err))
		})
	}
}

func TestAStepThatSentNoWriteIsRetriedUnlessTheServerRefusedIt(t *testing.T) {
	require.Equal(t, writebuf.Transient, classifyUnsent(io.EOF), "a lost connection while taking one")
	require.Equal(t, writebuf.Transient, classifyUnsent(errors.New("test: server unreachable")), "a pool hook's error")
	require.Equal(t, writebuf.Permanent, classifyUnsent(&pgconn.PgError{Code: "42501"}), "no privilege to create the table")
	require.Equal(t, writebuf.Permanent, classifyUnsent(puddle.ErrClosedPool))
}

// A session the server ended after the commit was sent may have committed
// (a terminate during a synchronous replication wait reports it as done
// locally): it is resolved, not retried blindly.
func TestASessionEndedAfterTheCommitWasSentIsResolved(t *testing.T) {
	s := &sqlSink{}
	fatal := &pgconn.PgError{Severity: "FATAL", Code: "57P01"}
	kind, _ := s.lostOrNot(nil, "t", backend{}, true, classify(context.Background(), fatal), fatal)
	require.Equal(t, writebuf.Unknown, kind)
	kind, _ = s.lostOrNot(nil, "t", backend{}, false, classify(context.Background(), fatal), fatal)
	require.Equal(t, writebuf.Transient, kind, "nothing was sent: retried")
	deadlock := &pgconn.PgError{Severity: "ERROR", Code: "40P01"}
	kind, _ = s.lostOrNot(nil, "t", backend{}, true, classify(context.Background(), deadlock), deadlock)
	require.Equal(t, writebuf.Transient, kind, "the server answered: rolled back")
}
