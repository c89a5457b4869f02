package mapbroker_test

import (
	"context"
	"log"
	"os"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/examples/centrifuge/mapbroker"
)

// A node whose map channels live in pgstore. (Compiled, not run: it needs a
// server.)
func ExampleNew() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	store, err := pgstore.New(ctx, pool, pgstore.WithChangeLog(time.Hour))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close(ctx)

	node, err := centrifuge.New(centrifuge.Config{Map: centrifuge.MapConfig{
		GetMapChannelOptions: func(string) centrifuge.MapChannelOptions {
			return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent}
		},
	}})
	if err != nil {
		log.Fatal(err)
	}
	broker, err := mapbroker.New(node, mapbroker.Config{Store: store, Pool: pool})
	if err != nil {
		log.Fatal(err)
	}
	node.SetMapBroker(broker) // the node closes it on Shutdown
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}
	defer node.Shutdown(ctx)

	res, err := node.MapPublish(ctx, "cars", "bmw", centrifuge.MapPublishOptions{Data: []byte(`{"hp":340}`)})
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("bmw is at offset %d of epoch %s", res.Position.Offset, res.Position.Epoch)
}
