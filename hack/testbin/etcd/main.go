// Command etcd is etcd's own server entry point, built as a tiny wrapper module because
// `go install go.etcd.io/etcd/server/v3@vX` is refused (etcd's go.mod has replace directives,
// which are ignored when the module is only a dependency, as here).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
