// k8scheck checks what `kustomize build` renders (YAML on stdin) with the code the cluster itself
// runs, since the machines that run the deployment tests have no cluster:
//
//   - every pod template (Deployment, StatefulSet, DaemonSet, Job, CronJob) against the Pod Security
//     Standards' `restricted` level at the newest version, with the upstream admission evaluator
//     (k8s.io/pod-security-admission), as a namespace labelled enforce=restricted would;
//   - every Gateway and HTTPRoute decoded strictly into the Gateway API's own Go types, so an
//     unknown or misspelt field fails (tests/deploy validates them against the CRDs' schemas too).
//
// It prints one line per object checked and exits 1 if any fails. Usage: k8scheck < rendered.yaml
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

type object struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
}

// podTemplate finds the pod template of a workload: spec.template, or spec.jobTemplate.spec.template.
type podTemplate struct {
	Spec struct {
		Template    *corev1.PodTemplateSpec `json:"template"`
		JobTemplate *struct {
			Spec struct {
				Template *corev1.PodTemplateSpec `json:"template"`
			} `json:"spec"`
		} `json:"jobTemplate"`
	} `json:"spec"`
}

func main() {
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		fail(err)
	}
	restricted := api.LevelVersion{Level: api.LevelRestricted, Version: api.LatestVersion()}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(os.Stdin))
	failed := false
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			fail(err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var obj object
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			fail(err)
		}
		name := obj.Kind + "/" + obj.Metadata.Name
		var problem string
		switch obj.Kind {
		case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob":
			problem = checkPod(evaluator, restricted, doc)
		case "Gateway":
			problem = strict(doc, &gatewayv1.Gateway{})
		case "HTTPRoute":
			problem = strict(doc, &gatewayv1.HTTPRoute{})
		default:
			continue
		}
		if problem != "" {
			failed = true
			fmt.Printf("FAIL %s: %s\n", name, problem)
		} else {
			fmt.Printf("ok %s\n", name)
		}
	}
	if failed {
		os.Exit(1)
	}
}

func checkPod(evaluator policy.Evaluator, level api.LevelVersion, doc []byte) string {
	var workload podTemplate
	if err := yaml.Unmarshal(doc, &workload); err != nil {
		return err.Error()
	}
	template := workload.Spec.Template
	if template == nil && workload.Spec.JobTemplate != nil {
		template = workload.Spec.JobTemplate.Spec.Template
	}
	if template == nil {
		return "no pod template"
	}
	result := policy.AggregateCheckResults(evaluator.EvaluatePod(level, &template.ObjectMeta, &template.Spec))
	if result.Allowed {
		return ""
	}
	problems := make([]string, len(result.ForbiddenReasons))
	for i, reason := range result.ForbiddenReasons {
		problems[i] = reason + " (" + result.ForbiddenDetails[i] + ")"
	}
	return "violates PodSecurity restricted:latest: " + strings.Join(problems, "; ")
}

func strict(doc []byte, into any) string {
	if err := yaml.UnmarshalStrict(doc, into); err != nil {
		return err.Error()
	}
	return ""
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "k8scheck:", err)
	os.Exit(2)
}
