// Command kube-scheduler is the upstream scheduler; it binds the pods of
// DaemonSets and Deployments to nodes in test/kube.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand()))
}
