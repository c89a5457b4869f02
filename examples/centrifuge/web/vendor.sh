#!/bin/sh
# vendor.sh copies centrifuge-js's browser bundle from the npm registry into
# web/vendor/, so that the page loads it from its own node and never from a
# CDN. Run it again, with another version, to update:
#
#	./web/vendor.sh 5.8.0
#
# npm checks each tarball against the registry's integrity hash. The bundle
# is copied byte for byte, with the licenses of what it holds beside it:
# centrifuge-js's own (MIT), and those of the two packages bundled into it,
# events (MIT) and the applyDelta part of fossil-delta (Simplified BSD).
set -eu

version=${1:-5.8.0}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm install --silent --no-audit --no-fund --omit=dev --ignore-scripts --prefix "$tmp" "centrifuge@$version" >/dev/null
pkg=node_modules/centrifuge
license=$(node -p "require('./$pkg/package.json').license")
if [ "$license" != MIT ]; then
	echo "vendor.sh: centrifuge@$version is licensed $license, not MIT: check that it may be vendored" >&2
	exit 1
fi
events=$(node -p "require('./node_modules/events/package.json').version")
# The bundle's fossil delta decoder is a part of fossil-delta, whose
# notice centrifuge-js keeps in its source; its license is fossil-delta's.
npm pack --silent fossil-delta@2.0.0 >/dev/null
tar -xzf fossil-delta-2.0.0.tgz
integrity=$(npm view "centrifuge@$version" dist.integrity)

cp "$pkg/dist/centrifuge.js" "$here/vendor/centrifuge.js"
cp "$pkg/LICENSE" "$here/vendor/LICENSE"
{
	echo "# Licenses of the code bundled into centrifuge.js"
	echo
	echo "## events $events (https://github.com/browserify/events)"
	echo
	echo '```'
	cat node_modules/events/LICENSE
	echo '```'
	echo
	echo "## fossil-delta, its applyDelta (https://github.com/dchest/fossil-delta-js)"
	echo
	echo '```'
	cat package/LICENSE
	echo '```'
} > "$here/vendor/THIRD_PARTY.md"
cat > "$here/vendor/README.md" <<END
# Vendored: centrifuge-js $version

\`centrifuge.js\` is \`dist/centrifuge.js\` of the npm package
[centrifuge@$version](https://www.npmjs.com/package/centrifuge/v/$version)
(<https://github.com/centrifugal/centrifuge-js>): the browser bundle of the
client for centrifuge's JSON protocol, which sets \`globalThis.Centrifuge\`,
copied unchanged by \`../vendor.sh\`. The package's tarball has the
integrity \`$integrity\`;
the bundle's SHA-256 is
\`$(sha256sum "$pkg/dist/centrifuge.js" | cut -d' ' -f1)\`.
Its last line names a source map, which is not vendored: a browser's
developer tools ask for it and get a 404, nothing else does.

centrifuge-js is Copyright (c) 2023 Centrifugal Labs LTD, under the MIT
license in \`LICENSE\`, which lets it be copied and distributed with its
notice. The bundle also holds the \`events\` package (MIT) and fossil-delta's
delta decoder (Simplified BSD), whose notices are in \`THIRD_PARTY.md\`.
END
echo "vendored centrifuge@$version into $here/vendor"
