// Command kube-controller-manager is the upstream controller manager (it
// runs the DaemonSet, Deployment and node controllers test/kube relies on).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
