// Command centrifuge is a Centrifuge node whose map channels live in
// PostgreSQL through pgstore, with the map broker of package mapbroker.
// Several of them on one schema are a cluster, with no Redis: a key set
// through any node reaches the subscribers of every node, and a client that
// reconnects to any node recovers what it missed from the channel's stream.
// It serves a page that shows a channel's keys live and sets and removes
// them.
//
//	go run . -addr :8000 &
//	go run . -addr :8001
//
// Authentication is for development only: every connection is let in, as a
// user of its own. See README.md for the settings and the design.
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
)

func main() {
	s, err := parseSettings(flag.CommandLine, os.Args[1:], os.LookupEnv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "centrifuge:", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, s, logger); err != nil {
		logger.Error("centrifuge: " + err.Error())
		os.Exit(1)
	}
}

// run serves until ctx ends, then disconnects the clients and stops the
// node.
func run(ctx context.Context, s *settings, logger *slog.Logger) error {
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(startCtx, s.pool)
	if err != nil {
		return err
	}
	defer pool.Close()
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	cfg := s.cfg
	cfg.Pool = pool
	cfg.Logger = logger
	// Nodes on one host differ by port.
	host, _ := os.Hostname()
	if host == "" {
		host = "centrifuge"
	}
	cfg.Name = fmt.Sprintf("%s:%d", host, ln.Addr().(*net.TCPAddr).Port)
	srv, err := NewServer(startCtx, cfg)
	if err != nil {
		_ = ln.Close()
		return err
	}
	cancel()
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	logger.Info("serving", "page", fmt.Sprintf("http://%s/", displayAddr(ln.Addr())), "schema", cfg.Schema, "channels", cfg.Channels)

	select {
	case err = <-served:
	case <-ctx.Done():
		logger.Info("shutting down")
	}
	stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The node first: it closes its WebSocket connections, which
	// http.Server.Shutdown does not wait for (they are hijacked).
	err = errors.Join(err, srv.Close(stopCtx))
	if serr := hs.Shutdown(stopCtx); serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// displayAddr names a listening address as a browser can open it.
func displayAddr(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok || !tcp.IP.IsUnspecified() {
		return a.String()
	}
	return fmt.Sprintf("localhost:%d", tcp.Port)
}
