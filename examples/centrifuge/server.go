package main

import (
	"context"
	"crypto/rand"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/examples/centrifuge/mapbroker"
)

//go:embed web/index.html web/app.js web/vendor/centrifuge.js
var web embed.FS

// Config configures a Server.
type Config struct {
	// Pool reaches the PostgreSQL database; the server's store and map
	// broker share it, so it needs at least 2 connections. Required.
	Pool *pgxpool.Pool
	// Schema holds the channels' tables, the change log and the broker's
	// tables. Every node of a cluster names the same one. Defaults to
	// "centrifuge".
	Schema string
	// Retention is how long the schema's change log keeps changes; it must
	// exceed StreamTTL, and be at least a minute. Defaults to 1 hour.
	Retention time.Duration
	// Channels are the map channels clients may use: each is a table of
	// the schema, made on first use, so an open list would let any client
	// make tables without bound. "*" allows every name that can be a table.
	// Defaults to "demo" alone.
	Channels []string
	// KeyTTL, when set, makes the channels MapModeRecoverable: a key not
	// published again within KeyTTL expires, and its removal goes into the
	// stream. Zero makes them MapModePersistent: keys stay until removed.
	// Give every node of a cluster the same. Defaults to 0.
	KeyTTL time.Duration
	// StreamSize is how many of a channel's last changes its stream keeps
	// for recovery: a client that missed more resynchronises from the
	// state. Defaults to 10,000.
	StreamSize int
	// StreamTTL is how long a channel's stream is kept after its last
	// change. Defaults to 10 minutes.
	StreamTTL time.Duration
	// Name names the node in centrifuge's logs and node list. Defaults to
	// the host name.
	Name string
	// ClientQueueMaxSize bounds what a client may have waiting to be
	// written, in bytes; a client that falls further behind is
	// disconnected, to recover on reconnect. Defaults to centrifuge's
	// (1 MiB).
	ClientQueueMaxSize int
	// Logger receives the node's, the broker's and the store's logs.
	// Defaults to slog.Default().
	Logger *slog.Logger
}

// Defaults of the Config fields, as documented on each.
const (
	DefaultSchema     = "centrifuge"
	DefaultRetention  = time.Hour
	DefaultStreamSize = 10_000
	DefaultStreamTTL  = 10 * time.Minute
)

// DefaultChannels are the channels of a Config without Channels.
var DefaultChannels = []string{"demo"}

// A Server is one centrifuge node whose map channels live in PostgreSQL, and
// its HTTP endpoints: the page (/), centrifuge-js (/vendor/centrifuge.js)
// and centrifuge's WebSocket transport (/connection/websocket). Servers on
// one schema are a cluster.
type Server struct {
	node   *centrifuge.Node
	broker *mapbroker.Broker
	store  *pgstore.Connector
	cfg    Config
	logger *slog.Logger
	mux    *http.ServeMux
}

// NewServer starts a node on cfg.Pool: the store (with the change log on),
// the map broker and the node itself. Close it to stop them.
func NewServer(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, logger: cfg.Logger}
	store, err := pgstore.New(ctx, cfg.Pool,
		pgstore.WithSchema(cfg.Schema),
		pgstore.WithChangeLog(cfg.Retention),
		pgstore.WithTablePolicy(s.tablePolicy),
		pgstore.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	s.store = store
	node, err := centrifuge.New(centrifuge.Config{
		Name:               cfg.Name,
		LogLevel:           centrifuge.LogLevelInfo,
		LogHandler:         s.log,
		ClientQueueMaxSize: cfg.ClientQueueMaxSize,
		Map:                centrifuge.MapConfig{GetMapChannelOptions: s.channelOptions},
	})
	if err != nil {
		return nil, errors.Join(err, s.closeStore())
	}
	s.node = node
	broker, err := mapbroker.New(node, mapbroker.Config{Store: store, Pool: cfg.Pool, Logger: cfg.Logger})
	if err != nil {
		return nil, errors.Join(err, s.closeStore())
	}
	s.broker = broker
	// Ordinary channels stay on the node's default memory Broker and
	// PresenceManager, which no other node sees: OnSubscribe refuses them.
	node.SetMapBroker(broker)
	node.OnConnecting(s.connecting)
	node.OnConnect(s.connect)
	if err := node.Run(); err != nil {
		return nil, errors.Join(err, s.Close(ctx))
	}

	s.mux = http.NewServeMux()
	s.mux.Handle("GET /connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	s.mux.HandleFunc("GET /{$}", s.file("web/index.html", "text/html; charset=utf-8"))
	s.mux.HandleFunc("GET /app.js", s.file("web/app.js", "text/javascript; charset=utf-8"))
	s.mux.HandleFunc("GET /vendor/centrifuge.js", s.file("web/vendor/centrifuge.js", "text/javascript; charset=utf-8"))
	return s, nil
}

func (cfg *Config) defaults() error {
	switch {
	case cfg.Pool == nil:
		return errors.New("Config.Pool is nil")
	case cfg.Retention < 0:
		return fmt.Errorf("Config.Retention must not be negative, got %v", cfg.Retention)
	case cfg.KeyTTL < 0:
		return fmt.Errorf("Config.KeyTTL must not be negative, got %v", cfg.KeyTTL)
	case cfg.StreamSize < 0:
		return fmt.Errorf("Config.StreamSize must not be negative, got %d", cfg.StreamSize)
	case cfg.StreamTTL < 0:
		return fmt.Errorf("Config.StreamTTL must not be negative, got %v", cfg.StreamTTL)
	}
	if cfg.Schema == "" {
		cfg.Schema = DefaultSchema
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	if len(cfg.Channels) == 0 {
		cfg.Channels = DefaultChannels
	}
	if cfg.StreamSize == 0 {
		cfg.StreamSize = DefaultStreamSize
	}
	if cfg.StreamTTL == 0 {
		cfg.StreamTTL = DefaultStreamTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Retention <= cfg.StreamTTL {
		// The broker reads a stream from the log: entries the log dropped
		// are unrecoverable, so the log must outlast the stream.
		return fmt.Errorf("Config.Retention (%v) must exceed Config.StreamTTL (%v): the streams are read from the change log", cfg.Retention, cfg.StreamTTL)
	}
	for _, ch := range cfg.Channels {
		if ch != "*" {
			if err := checkChannel(ch); err != nil {
				return fmt.Errorf("Config.Channels: %w", err)
			}
		}
	}
	return nil
}

// checkChannel reports why a channel cannot be a pgstore table, as the
// broker would, so that a client hears it at once and plainly.
func checkChannel(ch string) error {
	switch {
	case ch == "":
		return errors.New("a channel name is empty")
	case strings.Contains(ch, "/"):
		return fmt.Errorf("channel %q holds a /, which a pgstore table name cannot", ch)
	case len(ch) > 63:
		return fmt.Errorf("channel %q is %d bytes, over PostgreSQL's 63 for a table name", ch, len(ch))
	case strings.IndexByte(ch, 0) >= 0:
		return fmt.Errorf("channel %q holds a NUL byte", ch)
	}
	return nil
}

// allowed reports whether clients may use a channel.
func (s *Server) allowed(ch string) bool {
	if checkChannel(ch) != nil {
		return false
	}
	return slices.Contains(s.cfg.Channels, "*") || slices.Contains(s.cfg.Channels, ch)
}

// tablePolicy lets pgstore make only the tables of allowed channels, should
// anything reach the store past the handlers.
func (s *Server) tablePolicy(table string) error {
	if !s.allowed(table) {
		return fmt.Errorf("channel %q is not one of -channels", table)
	}
	return nil
}

// channelOptions are the map options of every channel. centrifuge calls
// them on every broker operation, on every node: keep them pure.
func (s *Server) channelOptions(string) centrifuge.MapChannelOptions {
	opts := centrifuge.MapChannelOptions{
		Mode:       centrifuge.MapModePersistent,
		StreamSize: s.cfg.StreamSize,
		StreamTTL:  s.cfg.StreamTTL,
	}
	if s.cfg.KeyTTL > 0 {
		opts.Mode = centrifuge.MapModeRecoverable
		opts.KeyTTL = s.cfg.KeyTTL
	}
	return opts
}

// connecting is the development authentication: every connection is let in
// as a user of its own, "dev-" and 8 random hex digits. Put real
// authentication here (a JWT, a session cookie) before anything else. The
// reply tells the client its user and the node's name, which the page
// shows.
func (s *Server) connecting(context.Context, centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
	var b [4]byte
	_, _ = rand.Read(b[:])
	user := "dev-" + hex.EncodeToString(b[:])
	data, err := json.Marshal(map[string]string{"user": user, "node": s.node.Config().Name})
	if err != nil {
		return centrifuge.ConnectReply{}, err
	}
	return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: user}, Data: data}, nil
}

// connect lets a client subscribe to the allowed map channels, and set and
// remove their keys.
func (s *Server) connect(c *centrifuge.Client) {
	c.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
		switch {
		case e.Type != centrifuge.SubscriptionTypeMap:
			// An ordinary channel would go through the node's memory
			// broker, which no other node sees.
			cb(centrifuge.SubscribeReply{}, centrifuge.ErrorNotAvailable)
		case !s.allowed(e.Channel):
			cb(centrifuge.SubscribeReply{}, centrifuge.ErrorPermissionDenied)
		default:
			cb(centrifuge.SubscribeReply{Options: centrifuge.SubscribeOptions{Type: centrifuge.SubscriptionTypeMap}}, nil)
		}
	})
	c.OnMapPublish(func(e centrifuge.MapPublishEvent, cb centrifuge.MapPublishCallback) {
		if err := s.checkChange(e.Channel, e.Key); err != nil {
			cb(centrifuge.MapPublishReply{}, err)
			return
		}
		cb(centrifuge.MapPublishReply{Key: e.Key}, nil)
	})
	c.OnMapRemove(func(e centrifuge.MapRemoveEvent, cb centrifuge.MapRemoveCallback) {
		if err := s.checkChange(e.Channel, e.Key); err != nil {
			cb(centrifuge.MapRemoveReply{}, err)
			return
		}
		cb(centrifuge.MapRemoveReply{Key: e.Key}, nil)
	})
}

func (s *Server) checkChange(ch, key string) error {
	switch {
	case !s.allowed(ch):
		return centrifuge.ErrorPermissionDenied
	case key == "" || len(key) > pgstore.MaxIDBytes:
		return centrifuge.ErrorBadRequest
	}
	return nil
}

// file serves an embedded file. The page runs only its own scripts and
// talks only to its own node.
func (s *Server) file(name, contentType string) http.HandlerFunc {
	body, err := web.ReadFile(name)
	if err != nil {
		panic(err) // embedded: cannot happen
	}
	return func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("Content-Type", contentType)
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")
		_, _ = w.Write(body)
	}
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Close disconnects the node's clients, stops the node and its broker, and
// closes the store. It leaves the pool open.
func (s *Server) Close(ctx context.Context) error {
	var err error
	if s.node != nil {
		// Shutdown closes the broker too.
		err = s.node.Shutdown(ctx)
	}
	if s.broker != nil {
		err = errors.Join(err, s.broker.Close(ctx))
	}
	return errors.Join(err, s.closeStore())
}

func (s *Server) closeStore() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.store.Close(ctx)
}

// log passes centrifuge's log entries to the logger.
func (s *Server) log(e centrifuge.LogEntry) {
	level := slog.LevelInfo
	switch e.Level {
	case centrifuge.LogLevelTrace, centrifuge.LogLevelDebug:
		level = slog.LevelDebug
	case centrifuge.LogLevelWarn:
		level = slog.LevelWarn
	case centrifuge.LogLevelError:
		level = slog.LevelError
	}
	attrs := make([]any, 0, 2*len(e.Fields)+2)
	for k, v := range e.Fields {
		attrs = append(attrs, k, v)
	}
	if e.Error != nil {
		attrs = append(attrs, "err", e.Error)
	}
	s.logger.Log(context.Background(), level, "centrifuge: "+e.Message, attrs...)
}
