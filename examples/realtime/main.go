// Command realtime is a WebSocket server that keeps its records in pgstore.
// Several of them on one PostgreSQL form a cluster: a change made through any
// node reaches the clients of every node. It serves a page that lists and
// edits the records of a table live.
//
//	go run ./examples/realtime -addr :8080 &
//	go run ./examples/realtime -addr :8081
//
// See README.md for the protocol.
package main

import (
	"cmp"
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

	"github.com/pgstore/pgstore"
)

const defaultURL = "postgres://postgres@127.0.0.1:5432/test"

func main() {
	addr := flag.String("addr", ":8080", "`address` to serve HTTP and WebSocket clients on")
	url := flag.String("url", "", "PostgreSQL connection `string` (default $DATABASE_URL, else "+defaultURL+")")
	schema := flag.String("schema", "realtime", "PostgreSQL `schema` that holds the records")
	retention := flag.Duration("retention", 24*time.Hour, "how long the schema's change log keeps changes (0: no log, the NOTIFY feed)")
	flag.Parse()
	*url = cmp.Or(*url, os.Getenv("DATABASE_URL"), defaultURL)
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, *url, *schema, *retention, logger); err != nil {
		logger.Error("realtime: " + err.Error())
		os.Exit(1)
	}
}

// run serves until ctx ends, then closes the connections and flushes the
// store.
func run(ctx context.Context, addr, url, schema string, retention time.Duration, logger *slog.Logger) error {
	connectCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	opts := []pgstore.Option{
		pgstore.WithSchema(schema),
		pgstore.WithVersionGuard(true), // a stale write racing in from another node is refused
		pgstore.WithLogger(logger),
	}
	if retention > 0 {
		// Events carry their values, and a lost LISTEN connection or a
		// slow node costs no re-read of everything.
		opts = append(opts, pgstore.WithChangeLog(retention))
	}
	store, err := pgstore.Connect(connectCtx, url, opts...)
	cancel()
	if err != nil {
		return err
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := store.Close(closeCtx); err != nil {
			logger.Error("closing the store", "err", err)
		}
	}()

	srv := NewServer(PGStore{store}, logger)
	defer srv.Close()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	logger.Info("serving", "page", fmt.Sprintf("http://%s/", displayAddr(ln.Addr())), "schema", schema)

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
