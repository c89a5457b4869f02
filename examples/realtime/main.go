// Command realtime is a WebSocket server that keeps its records in pgstore.
// Several of them on one PostgreSQL form a cluster: a change made through any
// node reaches the clients of every node. It serves a page that lists and
// edits the records of a table live.
//
//	go run ./examples/realtime -addr :8080 &
//	go run ./examples/realtime -addr :8081
//
// Its settings are flags, each with an environment variable that stands in
// for it; see README.md for them, for the protocol, and for the metrics and
// health it serves at /metrics and /healthz.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
)

func main() {
	s, err := parseSettings(flag.CommandLine, os.Args[1:], os.LookupEnv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "realtime:", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, s, logger); err != nil {
		logger.Error("realtime: " + err.Error())
		os.Exit(1)
	}
}

// run serves until ctx ends, then closes the connections and flushes the
// store.
func run(ctx context.Context, s *settings, logger *slog.Logger) error {
	connectCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	opts := []pgstore.Option{
		pgstore.WithSchema(s.schema),
		pgstore.WithVersionGuard(true), // a stale write racing in from another node is refused
		pgstore.WithLogger(logger),
	}
	if s.retention > 0 {
		// Events carry their values, and a lost LISTEN connection or a
		// slow node costs no re-read of everything.
		opts = append(opts, pgstore.WithChangeLog(s.retention))
	} else {
		opts = append(opts, pgstore.WithoutChangeLog())
	}
	pool, err := pgxpool.NewWithConfig(connectCtx, s.pool)
	if err != nil {
		return err
	}
	defer pool.Close() // after the store's Close, which flushes through it
	store, err := pgstore.New(connectCtx, pool, opts...)
	if err != nil {
		return err
	}
	cancel()
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := store.Close(closeCtx); err != nil {
			logger.Error("closing the store", "err", err)
		}
	}()

	srv := NewServer(PGStore{store}, s.limits, logger)
	defer srv.Close()
	// Before serving, so that /healthz is healthy from the first probe
	// and a feed that cannot start ends the command at once.
	if err := srv.Start(ctx); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	logger.Info("serving", "page", fmt.Sprintf("http://%s/", displayAddr(ln.Addr())), "schema", s.schema)

	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := hs.Shutdown(shutdownCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}

// displayAddr names a listening address as a browser can open it.
func displayAddr(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok || !tcp.IP.IsUnspecified() {
		return a.String()
	}
	return fmt.Sprintf("localhost:%d", tcp.Port)
}
